"""The platform's durable records: the port (``base``: typed records and protocols) and its adapters.

Everything above this package (control, core, gateway) reads and writes state through the
protocols in ``base``; the SQL lives in an adapter (``sqlite/`` today). Only ``core`` names
an adapter, so another one (PostgreSQL) can be added without touching the layers above.
"""
