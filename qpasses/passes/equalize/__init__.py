"""equalize"""
