"""The fault suite: each failure of issue 17 replayed on private servers, every fate checked.

    .venv/bin/python bench/faults.py                 every scenario (about 15 minutes)
    .venv/bin/python bench/faults.py --only poison resend
    .venv/bin/python bench/faults.py --list

A run starts its own Tansu, Mosquitto and PostgreSQL cluster on ports of its own
(`servers`), so it can kill them; the machine's servers are never touched. Each
scenario (`scenarios`) gets its own topics, table, registry schema and consumer group,
starts `usagepipe bridge` and `usagepipe consume` as processes (`processes`) so that
they can be SIGKILLed, plays a simulated fleet with `usagepipe simulate --ledger`,
does its harm at a moment it chooses, then runs `usagepipe verify` on the ledger and
prints a table of the fates it expected and the ones it found (`suite`).

Where a fault may lose data by design (a memory-only Kafka broker restarted), the
scenario states the bound it allows and reports the loss it measured; everywhere else
the expectation is exact: every stored message one row, every dead letter there with
its reason, nothing else.
"""
