#!/usr/bin/env bash
# A first run in the default sandbox: the guest's kernel, one HTTPS request the
# policy allows and one it blocks, and where both are logged.
#
# `fetch -w` prints the status code (200 for the allowed request when this
# machine reaches the internet); the blocked request gets the host's 403 page.
#
# The demo profile allows DNS for and GET requests to example.com (which needs
# this machine to reach the internet; without it the allowed request ends in
# a DNS failure, still logged as allowed), and answers names under
# `sandbox.demo` itself so that the blocked request reaches the host's TLS
# handler, which refuses it with 403 without connecting anywhere.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
sandbox=./target/release/sandbox
[ -x "$sandbox" ] || { echo "run ./setup.sh first" >&2; exit 1; }

profile="$(mktemp --suffix=.toml)"
trap 'rm -f "$profile"' EXIT
cat > "$profile" <<'TOML'
[security.rules.dns.example_com]
on = "dns.request"
if = 'dns.request.qname == "example.com"'
decision = "allow"

[security.rules.dns.demo_names]
on = "dns.request"
if = 'dns.request.qname.endsWith(".sandbox.demo")'
decision = "rewrite"
answer = { ttl = 60, a = ["192.0.2.10"] }

[security.rules.dns.demo_names_allowed]
on = "dns.request"
if = 'dns.request.qname.endsWith(".sandbox.demo")'
decision = "allow"

[security.rules.http.example_com_get]
on = "http.request"
if = 'http.request.host == "example.com" && http.request.method == "GET"'
decision = "allow"

[security.rules.http.example_com_responses]
on = "http.response"
if = 'http.request.host == "example.com"'
decision = "allow"
TOML

"$sandbox" run --profile "$profile" default -- /bin/sh -c '
uname -a
echo
echo "allowed by the policy: GET https://example.com/"
fetch -s -w -o /dev/null https://example.com/; echo "[fetch exit $?]"
echo
echo "blocked by the policy: GET https://blocked.sandbox.demo/"
fetch -s https://blocked.sandbox.demo/; echo "[fetch exit $?]"
'
echo
data="${SANDBOX_DATA:-${XDG_DATA_HOME:-$HOME/.local/share}/sandbox}"
echo "what the guest tried to reach ($data/sandboxes/$("$sandbox" ps -aq | sed -n 1p)/session.db, printed by: sandbox logs last):"
"$sandbox" logs last
