"""The composition root: the `usagepipe` console script and what only it needs.

Every other package is a library the console script puts together; nothing imports
this one. It holds the command handlers (`cli`), the demo (`demo`), the dead-letter
tool (`dlq`) and the manager of the local servers the demo and tests run on
(`services`: PostgreSQL, the project's Mosquitto on 1884, the Kafka-protocol broker).
"""
