"""Policies: who may run what, with which controls.

- schema.py   the policy file schema (one frozen dataclass tree, documented field by field)
- source.py   YAML -> data with the line of every key (parse)
- validate.py typed validation against a schema, every problem at once (validate)
- loader.py   cross-field and name checks, profile digests, system binds (resolve) -> PolicySet
- request.py  the request as a value, and its structural bounds (RequestError = INVALID_ARGUMENT)
- engine.py   (tenant, request, policies) -> Decision with the resolved Plan (PermissionDenied)
"""
