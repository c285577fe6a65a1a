"""Whole swarms of real processes: ``python -m bench.swarm.<name>``.

- ``api_load.py``    — the coordinator's API with the DHT full of simulated peers
- ``wan.py``         — compute utilisation of a group of two on a WAN-like link, with and without overlap;
  ``wan_hosts.py``   — its hosts: link delays, processes in namespaces, the metrics scraper
- ``chaos.py``       — a swarm across namespace hosts through kills, preemption, a partition, a lost donor;
  ``chaos_events.py`` — the disturbances and what each measured;
  ``chaos_swarm.py`` — the swarm it disturbs (one namespace host per process) and what its logs say
"""
