"""The device registry: who owns which appliance, since when, and what they agreed to.

The data path, in modules:

- `devices.sql` and `devices.schema`: the PostgreSQL tables and their migrations, run by
  the data path's versioned runner (`ingest.migrations`).
- `devices.factory_import`: manufactured units arrive from the factory's CSV export.
- `devices.registry`: the one entry point (`Registry`, an async context manager).
  Its rules live in `devices.ownership` (registration, periods, transfers,
  credentials, attribution) and `devices.owners` (consent, dormancy, reactivation,
  erasure).
- `devices.credentials`: salted scrypt hashes of registration codes and MQTT secrets.
- `devices.outbox` and `devices.events`: events written with each change, published to
  Kafka after the commit; `devices.broker`: the MQTT broker's device accounts, given
  out in step with the registry's transactions and kept on Mosquitto by
  `devices.mosquitto` (its dynamic-security plugin).
- `devices.records` and `devices.errors`: the vocabulary and the error tree.
- `devices.api` and `devices.cli`: the HTTP API and the `usagepipe registry` commands.
"""
