"""The CLI's commands, one module per group of jobs; rollout.cli puts them together.

They parse, call and print: the work is done by the modules they call (controller, fleet,
image, oci, schema, ...), so a command never holds rollout logic.
"""
