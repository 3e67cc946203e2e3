"""schemathesis hooks for scripts/contract.sh.

The fuzzer calls as the bootstrap admin and learns that client's id from its own token. An admin
may switch itself off (disable, lock down, delete, or demote itself) once another admin exists,
and the fuzzer registers admins of its own: were it to do that to itself, every later request
would be refused `client_disabled` and the run would test nothing more. So requests that would
change the fuzzer's own client go to a client that does not exist instead (404). Everything
else, including these operations on every other client, is fuzzed as generated.
"""

import os
import uuid

import schemathesis

OWN_ID = os.environ["KB_CONTRACT_ADMIN_ID"]
SWITCH_OFF = {
    ("PATCH", "/v1/admin/clients/{id}"),
    ("DELETE", "/v1/admin/clients/{id}"),
    ("POST", "/v1/admin/clients/{id}/disable"),
    ("POST", "/v1/admin/clients/{id}/lockdown"),
}


@schemathesis.hook
def before_call(context, case, kwargs):
    operation = (case.operation.method.upper(), case.operation.path)
    if operation in SWITCH_OFF and str((case.path_parameters or {}).get("id", "")).lower() == OWN_ID:
        case.path_parameters = {**case.path_parameters, "id": str(uuid.uuid4())}
