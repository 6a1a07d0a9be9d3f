"""Engines: what serves the gateway's Method tables (gateway/server/rpc.py) on a listening port."""
