"""The device registry: who owns which appliance, since when, and what they agreed to.

The data path, in modules:

- `devices.sql` and `devices.migrations`: the PostgreSQL tables and the versioned
  migration runner (shared with the usage store).
- `devices.factory_import`: manufactured units arrive from the factory's CSV export.
- `devices.registry`: owners register units with model, serial and the code printed
  inside; ownership periods, consent, dormancy and erasure.
- `devices.credentials`: the MQTT secrets devices use, stored only as salted hashes.
- `devices.events` and `devices.broker`: what the registry tells the rest of the system
  (Kafka events) and the MQTT broker (device accounts).
- `devices.api` and `devices.cli`: the HTTP API and the `usagepipe registry` commands.
"""
