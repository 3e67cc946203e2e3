"""schemathesis hooks for scripts/contract.sh.

The fuzzer calls as the bootstrap admin and learns that client's id from its own token. An admin
may switch itself off (disable, lock down, delete, or demote itself) once another admin exists,
and the fuzzer registers admins of its own: were it to do that to itself, every later request
would be refused `client_disabled` and the run would test nothing more. So requests that would
change the fuzzer's own client go to a client that does not exist instead (404). Everything
else, including these operations on every other client, is fuzzed as generated.

The fuzzer learns ids from earlier responses (its pool of captured values), so the admin's own id
can also arrive in a stateful step that follows a link from `POST /v1/admin/clients`. The 404 of
the stand-in is then not an answer to the link's request, and its "created resource not found"
(ST302) is dropped for exactly those requests: every other failure of theirs, and every ST302 of
a request sent as generated, stands.

DELETE of a managed key or a secret schedules its destruction after a pending window (1-30 days,
cancellable), as AWS KMS's ScheduleKeyDeletion does: until then it stays readable, a key in state
`pending_deletion`. A read after DELETE answering 200 is that design, not a use-after-free, and
its "deleted resource still available" (ST301) is dropped: for a key only when the answer says
`pending_deletion`; a secret's value carries no state, so for a secret whenever the read
succeeds. (A client's DELETE is immediate, and keeps the check.) Per-operation settings in
schemathesis.toml do not reach the stateful phase's checks, so this lives here.
"""

import json
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


# The stand-in ids sent instead of the admin's own.
STAND_INS = set()


@schemathesis.hook
def before_call(context, case, kwargs):
    operation = (case.operation.method.upper(), case.operation.path)
    if operation in SWITCH_OFF and str((case.path_parameters or {}).get("id", "")).lower() == OWN_ID:
        stand_in = str(uuid.uuid4())
        STAND_INS.add(stand_in)
        case.path_parameters = {**case.path_parameters, "id": stand_in}


@schemathesis.hook
def filter_failure(context, failure, case, response):
    operation = (case.operation.method.upper(), case.operation.path)
    if failure.code == "ST302":
        return str((case.path_parameters or {}).get("id", "")) not in STAND_INS
    if failure.code == "ST301":
        if operation == ("GET", "/v1/secrets/{name}"):
            return False
        if operation == ("GET", "/v1/keys/{id}"):
            return key_state(response) != "pending_deletion"
    return True


def key_state(response):
    try:
        return json.loads(response.content)["key"]["state"]
    except (ValueError, KeyError, TypeError):
        return None
