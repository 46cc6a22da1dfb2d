"""The commands that read a sweep's records: `orch report` (`report`), `orch compare` and
the machine formats (`compare`), `orch export` (`export`), `orch sync` (`sync`), and
finding a sweep by id or folder (`sweeps`). They never import the driver."""
