"""Migrations for plain PostgreSQL: a natively range-partitioned usage table."""
