"""The gRPC API: the only place that imports the generated code (sandboxd/api/gen).

- errors.py      the one table from sandboxd.errors classes to gRPC status codes
- convert.py     wire messages <-> domain values (RunRequest, Result, Decision)
- auth.py        who is calling: unix peer uid, bearer token, client certificate -> tenant
- unix_front.py  the public unix socket: reads SO_PEERCRED and passes the uid to gRPC
- servicer.py    thin servicers: translate, call sandboxd.engine.service.Core, translate back
- server.py      listeners, health, reflection, signals, graceful shutdown (`sandboxd serve`)
"""
