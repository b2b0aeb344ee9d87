"""The device registry: who owns which appliance, since when, and what they agreed to.

The data path, in modules:

- `devices.sql` and `ingest.migrations`: the PostgreSQL tables and the generic,
  versioned migration runner (the usage store reuses it for its own tables).
- `devices.factory_import`: manufactured units arrive from the factory's CSV export.
- `devices.registry`: the one entry point (`Registry`, an async context manager).
  Its rules live in `devices.ownership` (registration, periods, credentials,
  attribution) and `devices.owners` (consent, dormancy, reactivation, erasure).
- `devices.credentials`: salted scrypt hashes of registration codes and MQTT secrets.
- `devices.outbox` and `devices.events`: events written with each change, published to
  Kafka after the commit; `devices.broker`: the MQTT broker's device accounts, kept on
  Mosquitto by `devices.mosquitto` (its dynamic-security plugin).
- `devices.records` and `devices.errors`: the vocabulary and the error tree.
- `devices.api` and `devices.cli`: the HTTP API and the `usagepipe registry` commands.
"""
