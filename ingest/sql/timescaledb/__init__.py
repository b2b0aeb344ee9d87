"""Migrations for PostgreSQL with TimescaleDB: a hypertable and continuous aggregates."""
