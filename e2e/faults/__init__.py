"""The fault-tolerance suite (`make test-faults`): KVC under seeded crashes and restarts."""
