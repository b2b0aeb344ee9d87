"""Fleets of simulated appliances that drive the whole path without hardware.

    units.py        the simulated product models, the units made of them, device ids
    provision.py    a fleet made, sold and registered in the real registry
    history.py      each unit's history: purchases, channels, changes of hands
    plan.py         what a fleet sends: the plan, and each device's messages under it
    usage.py        how households use each kind of appliance, day by day
    owners.py       who owns each unit: household, account, firmware, changes of hands
    traffic.py      the messages a unit sends, with the faults QA asks for
    faults.py       those faults: duplicates, reordering, bad bodies, reboots
    fleet.py        the publishers: many MQTT clients, bounded in flight
    report.py       what a run did, counted on the broker's answers
    ledger.py       what was sent, kept so it can be checked
    verify.py       the ledger reconciled with the stored rows and dead letters
    cli.py          `usagepipe simulate`, `usagepipe verify`

Simulators sit above the data path, the registry and the planners' side, and below
the console script (`usagepipe`).
"""
