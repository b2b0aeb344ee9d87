"""The registry's migrations, `NNN_name.sql`, applied in order by `ingest.migrations`."""
