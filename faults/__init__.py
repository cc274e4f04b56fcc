"""The fault suite (`make faults`): issue 15 section 4, see faults/README.md."""
