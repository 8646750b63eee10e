"""Stage 8, offline reports over saved JSON logs (``xfrmtrace report``).

- :mod:`.reader`: reads logs and groups the errors; :mod:`.html`: the self-contained page.
"""
