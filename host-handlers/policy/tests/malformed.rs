#![allow(clippy::unwrap_used)]
//! Malformed profiles, each with the exact error it must produce.

use policy::{Engine, Layer, ProfileSource, Secrets};

/// (what is wrong, the profile, the expected error)
const CASES: &[(&str, &str, &str)] = &[
    (
        "toml syntax: unclosed string",
        r##"[security.rules.http.a]
on = "http.request
"##,
        "p.toml:2:19: invalid basic string",
    ),
    (
        "toml syntax: bad table header",
        r##"[security.rules.http.a
on = "http.request"
"##,
        "p.toml:1:23: invalid table header: expected `.`, `]`",
    ),
    (
        "unknown top-level table",
        r##"[securty.rules.http.a]
on = "http.request"
decision = "allow"
"##,
        "p.toml:1:2: unknown field `securty`, expected `security`",
    ),
    (
        "unknown key in [security]",
        r##"[security]
lock = ["http"]
"##,
        "p.toml:2:1: unknown field `lock`, expected one of `description`, `locks`, `rules`, `limits`",
    ),
    (
        "unknown key in a rule",
        r##"[security.rules.http.a]
on = "http.request"
iff = 'http.request.host == "x"'
decision = "allow"
"##,
        "p.toml:3:1: unknown field `iff`, expected one of `on`, `if`, `decision`, `priority`, `description`, `set_request_headers`, `remove_request_headers`, `set_response_headers`, `remove_response_headers`, `answer`, `mode`",
    ),
    (
        "missing on",
        r##"[security.rules.http.a]
decision = "allow"
"##,
        "p.toml:1:1: missing field `on`",
    ),
    (
        "missing decision",
        r##"[security.rules.http.a]
on = "http.request"
"##,
        "p.toml:1:1: missing field `decision`",
    ),
    (
        "priority is a string",
        r##"[security.rules.http.a]
on = "http.request"
decision = "allow"
priority = "10"
"##,
        "p.toml:4:12: invalid type: string \"10\", expected i64",
    ),
    (
        "priority is a float",
        r##"[security.rules.http.a]
on = "http.request"
decision = "allow"
priority = 1.5
"##,
        "p.toml:4:12: invalid type: floating point `1.5`, expected i64",
    ),
    (
        "section is not a table",
        r##"[security.rules]
http = 1
"##,
        "p.toml:2:8: invalid type: integer `1`, expected a map",
    ),
    (
        "rule is not a table",
        r##"[security.rules.http]
a = "allow"
"##,
        "p.toml:2:5: invalid type: string \"allow\", expected struct RuleToml",
    ),
    (
        "duplicate rule in one file",
        r##"[security.rules.http.a]
on = "http.request"
decision = "allow"

[security.rules.http.a]
on = "http.request"
decision = "block"
"##,
        "p.toml:5:1: invalid table header: duplicate key `a` in table `security.rules.http`",
    ),
    (
        "duplicate key in a rule",
        r##"[security.rules.http.a]
on = "http.request"
on = "http.response"
decision = "allow"
"##,
        "p.toml:3:1: duplicate key `on` in table `security.rules.http.a`",
    ),
    (
        "unknown section",
        r##"[security.rules.htp.a]
on = "http.request"
decision = "allow"
"##,
        "p.toml:1:17: unknown section `htp` (sections: dns, http, tcp)",
    ),
    (
        "unknown event",
        r##"[security.rules.http.a]
on = "http.requests"
decision = "allow"
"##,
        "p.toml:2:7: unknown event `http.requests` (events: dns.request, http.request, http.response, tcp.connect)",
    ),
    (
        "event in the wrong section",
        r##"[security.rules.dns.a]
on = "http.request"
decision = "allow"
"##,
        "p.toml:2:7: `http.request` rules belong in section `http`, not `dns` (write [security.rules.http.a])",
    ),
    (
        "unknown decision",
        r##"[security.rules.http.a]
on = "http.request"
decision = "alow"
"##,
        "p.toml:3:13: unknown decision `alow` (decisions: allow, block, ask, rewrite)",
    ),
    (
        "priority below range",
        r##"[security.rules.http.a]
on = "http.request"
decision = "allow"
priority = -1
"##,
        "p.toml:4:12: priority -1 is out of range (0 to 1000, lowest wins)",
    ),
    (
        "priority above range",
        r##"[security.rules.http.a]
on = "http.request"
decision = "allow"
priority = 1001
"##,
        "p.toml:4:12: priority 1001 is out of range (0 to 1000, lowest wins)",
    ),
    (
        "invalid rule name",
        r##"[security.rules.http."a b"]
on = "http.request"
decision = "allow"
"##,
        "p.toml:1:22: invalid rule name `a b`: use letters, digits, `_` and `-`",
    ),
    (
        "empty rule name",
        r##"[security.rules.http.""]
on = "http.request"
decision = "allow"
"##,
        "p.toml:1:22: invalid rule name ``: use letters, digits, `_` and `-`",
    ),
    (
        "empty condition",
        r##"[security.rules.http.a]
on = "http.request"
if = ""
decision = "allow"
"##,
        "p.toml:3:7: the condition is empty",
    ),
    (
        "CEL syntax error",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.host == '
decision = "allow"
"##,
        "p.toml:3:28: invalid condition: syntax error: mismatched input '<EOF>' expecting {'[', '{', '(', '.', '-', '!', 'true', 'false', 'null', NUM_FLOAT, NUM_INT, NUM_UINT, STRING, BYTES, IDENTIFIER}",
    ),
    (
        "CEL syntax error in a multi-line condition",
        r##"[security.rules.http.a]
on = "http.request"
if = '''
http.request.host == "x" &&
  http.request.path ==
'''
decision = "allow"
"##,
        "p.toml:6:1: invalid condition: syntax error: mismatched input '<EOF>' expecting {'[', '{', '(', '.', '-', '!', 'true', 'false', 'null', NUM_FLOAT, NUM_INT, NUM_UINT, STRING, BYTES, IDENTIFIER}",
    ),
    (
        "unknown field in a condition",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.hots == "pypi.org"'
decision = "allow"
"##,
        "p.toml:3:19: unknown field `hots` of `http.request` (fields: host, sni, method, path, raw_path, query, scheme, port, headers)",
    ),
    (
        "unknown field after escapes in a basic string",
        r##"[security.rules.http.a]
on = "http.request"
if = "http.request.host == \"pypi.org\" || http.request.pth == \"/\""
decision = "allow"
"##,
        "p.toml:3:56: unknown field `pth` of `http.request` (fields: host, sni, method, path, raw_path, query, scheme, port, headers)",
    ),
    (
        "field of another event",
        r##"[security.rules.http.a]
on = "http.request"
if = 'dns.request.qname == "x"'
decision = "allow"
"##,
        "p.toml:3:18: `dns.request.qname` is not available in `http.request` rules (available: http.request.host, http.request.sni, http.request.method, http.request.path, http.request.raw_path, http.request.query, http.request.scheme, http.request.port, http.request.headers)",
    ),
    (
        "response field in a request rule",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.response.status == 200'
decision = "allow"
"##,
        "p.toml:3:20: `http.response.status` is not available in `http.request` rules (available: http.request.host, http.request.sni, http.request.method, http.request.path, http.request.raw_path, http.request.query, http.request.scheme, http.request.port, http.request.headers)",
    ),
    (
        "unknown event in a condition",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.reqest.host == "x"'
decision = "allow"
"##,
        "p.toml:3:18: unknown event `http.reqest` in `http.reqest.host`",
    ),
    (
        "an event used as a value",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request == "x"'
decision = "allow"
"##,
        "p.toml:3:11: `http.request` is an event, not a field; use one of its fields: host, sni, method, path, raw_path, query, scheme, port, headers",
    ),
    (
        "a namespace used as a value",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http'
decision = "allow"
"##,
        "p.toml:3:7: `http` is not a field; conditions use fields such as http.request.host, http.request.sni, http.request.method, http.request.path, http.request.raw_path, http.request.query, http.request.scheme, http.request.port, http.request.headers",
    ),
    (
        "unknown name",
        r##"[security.rules.http.a]
on = "http.request"
if = 'host == "x"'
decision = "allow"
"##,
        "p.toml:3:7: unknown name `host`; conditions use fields such as http.request.host, http.request.sni, http.request.method, http.request.path, http.request.raw_path, http.request.query, http.request.scheme, http.request.port, http.request.headers",
    ),
    (
        "type error: string compared with int",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.host == 443'
decision = "allow"
"##,
        "p.toml:3:25: cannot compare string with int",
    ),
    (
        "type error: int compared with string",
        r##"[security.rules.tcp.a]
on = "tcp.connect"
if = 'tcp.connect.port == "443"'
decision = "allow"
"##,
        "p.toml:3:24: cannot compare int with string",
    ),
    (
        "condition is not a bool",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.host'
decision = "allow"
"##,
        "p.toml:3:19: the condition must be a bool, found string",
    ),
    (
        "condition is an int",
        r##"[security.rules.http.a]
on = "http.response"
if = 'http.response.status + 1'
decision = "allow"
"##,
        "p.toml:3:28: the condition must be a bool, found int",
    ),
    (
        "&& on a string",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.host && true'
decision = "allow"
"##,
        "p.toml:3:19: `&&` needs bool operands, found string",
    ),
    (
        "! on a string",
        r##"[security.rules.http.a]
on = "http.request"
if = '!http.request.host'
decision = "allow"
"##,
        "p.toml:3:7: `!` needs a bool, found string",
    ),
    (
        "unknown function",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.host.lowerAscii() == "x"'
decision = "allow"
"##,
        "p.toml:3:35: unknown function `lowerAscii` (conditions may use the CEL operators, size, contains, startsWith, endsWith, matches, int, uint, double, string, bool, bytes, dyn and the macros has, all, exists, exists_one, map, filter)",
    ),
    (
        "wrong argument type",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.host.endsWith(1)'
decision = "allow"
"##,
        "p.toml:3:33: `endsWith` is called as <string>.endsWith(<string>), found string.endsWith(int)",
    ),
    (
        "wrong argument count",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.host.startsWith("a", "b")'
decision = "allow"
"##,
        "p.toml:3:35: `startsWith` is called as <string>.startsWith(<string>), found string.startsWith(string, string)",
    ),
    (
        "matches with a computed pattern",
        r##"[security.rules.http.a]
on = "http.request"
if = '"x".matches(http.request.path)'
decision = "allow"
"##,
        "p.toml:3:31: the pattern of matches() must be a string literal",
    ),
    (
        "invalid regular expression",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.host.matches("[a-z")'
decision = "allow"
"##,
        "p.toml:3:33: invalid regular expression: unclosed character class",
    ),
    (
        "indexing a string",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.host[0] == "x"'
decision = "allow"
"##,
        "p.toml:3:24: cannot index string with int",
    ),
    (
        "selecting on a string",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.host.length == 3'
decision = "allow"
"##,
        "p.toml:3:24: cannot select `length` on string",
    ),
    (
        "has() on an event field",
        r##"[security.rules.http.a]
on = "http.request"
if = 'has(http.request.host)'
decision = "allow"
"##,
        "p.toml:3:10: has() cannot test `http.request.host`: event fields are always present; has() tests map keys, e.g. has(http.request.headers.authorization)",
    ),
    (
        "capitalised header name",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.headers["Authorization"] == "x"'
decision = "allow"
"##,
        "p.toml:3:28: header names are lower case in events: write `authorization` instead of `Authorization`",
    ),
    (
        "capitalised header name in has()",
        r##"[security.rules.http.a]
on = "http.request"
if = 'has(http.request.headers.Cookie)'
decision = "allow"
"##,
        "p.toml:3:10: header names are lower case in events: write `cookie` instead of `Cookie`",
    ),
    (
        "header map indexed with an int",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.headers[1] == "x"'
decision = "allow"
"##,
        "p.toml:3:27: the keys of this map are string, not int",
    ),
    (
        "conditional with mixed branches",
        r##"[security.rules.http.a]
on = "http.request"
if = '(http.request.host == "x" ? 1 : "y") == 1'
decision = "allow"
"##,
        "p.toml:3:33: the branches of `? :` have different types: int and string",
    ),
    (
        "in with mismatched list",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.host in [1, 2]'
decision = "allow"
"##,
        "p.toml:3:25: cannot look for string in list(int)",
    ),
    (
        "adding string and int",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.host + 1 == "x"'
decision = "allow"
"##,
        "p.toml:3:25: cannot add string and int",
    ),
    (
        "iterating over a string",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.host.exists(c, c == "a")'
decision = "allow"
"##,
        "p.toml:3:19: cannot iterate over string",
    ),
    (
        "message construction",
        r##"[security.rules.http.a]
on = "http.request"
if = 'Foo{a: 1} == http.request.host'
decision = "allow"
"##,
        "p.toml:3:10: message construction (`Foo{...}`) is not supported",
    ),
    (
        "optional syntax",
        r##"[security.rules.http.a]
on = "http.request"
if = 'http.request.headers.?accept == "x"'
decision = "allow"
"##,
        "p.toml:3:27: invalid condition: unsupported syntax '.?'",
    ),
    (
        "ordering strings and ints",
        r##"[security.rules.http.a]
on = "http.response"
if = 'http.response.status < "500"'
decision = "allow"
"##,
        "p.toml:3:28: cannot order int and string",
    ),
    (
        "condition too long",
        r##"LONG
"##,
        "p.toml:3:7: the condition is longer than 8192 bytes",
    ),
    (
        "action on an allow rule",
        r##"[security.rules.http.a]
on = "http.request"
decision = "allow"
set_request_headers = { "x-a" = "b" }
"##,
        "p.toml:4:23: `set_request_headers` is an action: it needs `decision = \"rewrite\"`",
    ),
    (
        "rewrite rule without actions",
        r##"[security.rules.http.a]
on = "http.request"
decision = "rewrite"
"##,
        "p.toml:3:13: a rewrite rule needs an action: set_request_headers or remove_request_headers",
    ),
    (
        "request headers on a response rule",
        r##"[security.rules.http.a]
on = "http.response"
decision = "rewrite"
set_request_headers = { "x-a" = "b" }
"##,
        "p.toml:4:23: `set_request_headers` applies to `http.request` rules, not `http.response`",
    ),
    (
        "response headers on a request rule",
        r##"[security.rules.http.a]
on = "http.request"
decision = "rewrite"
remove_response_headers = ["set-cookie"]
"##,
        "p.toml:4:27: `remove_response_headers` applies to `http.response` rules, not `http.request`",
    ),
    (
        "answer on an http rule",
        r##"[security.rules.http.a]
on = "http.request"
decision = "rewrite"
answer = { a = ["10.0.0.1"] }
"##,
        "p.toml:4:10: `answer` applies to `dns.request` rules, not `http.request`",
    ),
    (
        "rewrite on tcp",
        r##"[security.rules.tcp.a]
on = "tcp.connect"
decision = "rewrite"
"##,
        "p.toml:3:13: `tcp.connect` rules cannot rewrite (there is nothing to rewrite)",
    ),
    (
        "invalid header name",
        r##"[security.rules.http.a]
on = "http.request"
decision = "rewrite"
set_request_headers = { "bad header" = "b" }
"##,
        "p.toml:4:25: invalid header name `bad header`",
    ),
    (
        "control character in a header value",
        r##"[security.rules.http.a]
on = "http.request"
decision = "rewrite"
set_request_headers = { "x-a" = "one\ntwo" }
"##,
        "p.toml:4:37: the value of header `x-a` contains a control character",
    ),
    (
        "header both set and removed",
        r##"[security.rules.http.a]
on = "http.request"
decision = "rewrite"
set_request_headers = { cookie = "" }
remove_request_headers = ["Cookie"]
"##,
        "p.toml:4:25: header `cookie` is both set and removed",
    ),
    (
        "header removed twice",
        r##"[security.rules.http.a]
on = "http.request"
decision = "rewrite"
remove_request_headers = ["cookie", "COOKIE"]
"##,
        "p.toml:4:38: header `cookie` is listed twice",
    ),
    (
        "unknown placeholder",
        r##"[security.rules.http.a]
on = "http.request"
decision = "rewrite"
set_request_headers = { authorization = "Bearer ${env:TOKEN}" }
"##,
        "p.toml:4:49: unknown placeholder `${env:TOKEN}`: only `${secret:NAME}` is supported",
    ),
    (
        "unterminated placeholder",
        r##"[security.rules.http.a]
on = "http.request"
decision = "rewrite"
set_request_headers = { authorization = "Bearer ${secret:TOKEN" }
"##,
        "p.toml:4:49: unterminated placeholder: write `${secret:NAME}`",
    ),
    (
        "invalid secret name",
        r##"[security.rules.http.a]
on = "http.request"
decision = "rewrite"
set_request_headers = { authorization = "Bearer ${secret:1TOKEN}" }
"##,
        "p.toml:4:49: invalid secret name `1TOKEN`: use letters, digits and `_`",
    ),
    (
        "missing secret",
        r##"[security.rules.http.a]
on = "http.request"
decision = "rewrite"
set_request_headers = { authorization = "Bearer ${secret:MISSING}" }
"##,
        "p.toml:4:49: secret `MISSING` is not set (looked in the secrets given to the engine)",
    ),
    (
        "secret with a newline",
        r##"[security.rules.http.a]
on = "http.request"
decision = "rewrite"
set_request_headers = { authorization = "${secret:BAD}" }
"##,
        "p.toml:4:42: secret `BAD` cannot go in a header: its value contains a control character",
    ),
    (
        "invalid IPv4 address",
        r##"[security.rules.dns.a]
on = "dns.request"
decision = "rewrite"
answer = { a = ["10.0.0.256"] }
"##,
        "p.toml:4:18: invalid IPv4 address `10.0.0.256`",
    ),
    (
        "invalid IPv6 address",
        r##"[security.rules.dns.a]
on = "dns.request"
decision = "rewrite"
answer = { aaaa = ["fd00::1::2"] }
"##,
        "p.toml:4:21: invalid IPv6 address `fd00::1::2`",
    ),
    (
        "invalid CNAME",
        r##"[security.rules.dns.a]
on = "dns.request"
decision = "rewrite"
answer = { cname = "bad..name" }
"##,
        "p.toml:4:21: invalid domain name `bad..name`",
    ),
    (
        "CNAME with other records",
        r##"[security.rules.dns.a]
on = "dns.request"
decision = "rewrite"
answer = { cname = "other.example", a = ["10.0.0.1"] }
"##,
        "p.toml:4:20: a CNAME cannot be combined with other records (RFC 1034)",
    ),
    (
        "TXT too long",
        r##"TXTLONG
"##,
        "p.toml:4:20: a TXT string is at most 255 bytes",
    ),
    (
        "negative ttl",
        r##"[security.rules.dns.a]
on = "dns.request"
decision = "rewrite"
answer = { ttl = -5, a = ["10.0.0.1"] }
"##,
        "p.toml:4:18: ttl -5 is out of range (0 to 2147483647)",
    ),
    (
        "ttl too large",
        r##"[security.rules.dns.a]
on = "dns.request"
decision = "rewrite"
answer = { ttl = 4294967296, a = ["10.0.0.1"] }
"##,
        "p.toml:4:18: ttl 4294967296 is out of range (0 to 2147483647)",
    ),
    (
        "answer without records",
        r##"[security.rules.dns.a]
on = "dns.request"
decision = "rewrite"
answer = { ttl = 30 }
"##,
        "p.toml:4:10: the answer has no records: give a, aaaa, cname or txt",
    ),
    (
        "unknown answer key",
        r##"[security.rules.dns.a]
on = "dns.request"
decision = "rewrite"
answer = { mx = ["mail.example"] }
"##,
        "p.toml:4:12: unknown field `mx`, expected one of `ttl`, `a`, `aaaa`, `cname`, `txt`",
    ),
    (
        "placeholder in TXT",
        r##"[security.rules.dns.a]
on = "dns.request"
decision = "rewrite"
answer = { txt = ["${secret:TOKEN}"] }
"##,
        "p.toml:4:20: placeholders are only allowed in header values",
    ),
    (
        "unknown section in locks",
        r##"[security]
locks = ["http", "htp"]
"##,
        "p.toml:2:19: unknown section `htp` in locks (sections: dns, http, tcp)",
    ),
    (
        "locks is not a list",
        r##"[security]
locks = "http"
"##,
        "p.toml:2:9: invalid type: string \"http\", expected a sequence",
    ),
    (
        "not UTF-8",
        r##"NOTUTF8
"##,
        "p.toml:2:12: the profile is not valid UTF-8",
    ),
];

/// Loads a profile; the error as text, or "loaded". Bytes that are not
/// UTF-8 can only come from a file.
fn load(profile: Vec<u8>) -> String {
    let source = match String::from_utf8(profile) {
        Ok(text) => ProfileSource::Text { name: "p.toml".into(), text },
        Err(error) => {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("p.toml");
            std::fs::write(&path, error.as_bytes()).unwrap();
            let result = Engine::builder().profile(Layer::User, ProfileSource::File(path.clone())).build();
            let message = result.unwrap_err().to_string();
            return message.replace(&path.display().to_string(), "p.toml");
        }
    };
    let secrets = Secrets::none().with_value("TOKEN", "t0k3n").with_value("BAD", "a\nb");
    match Engine::builder().profile(Layer::User, source).secrets(secrets).build() {
        Ok(_) => "loaded".to_owned(),
        Err(error) => error.to_string(),
    }
}

fn profile(text: &str) -> Vec<u8> {
    match text.trim() {
        "LONG" => format!(
            "[security.rules.http.a]\non = \"http.request\"\nif = '{}'\ndecision = \"allow\"\n",
            vec!["http.request.host == \"x\""; 400].join(" || ")
        )
        .into_bytes(),
        "TXTLONG" => format!(
            "[security.rules.dns.a]\non = \"dns.request\"\ndecision = \"rewrite\"\nanswer = {{ txt = [\"{}\"] }}\n",
            "x".repeat(256)
        )
        .into_bytes(),
        "NOTUTF8" => b"[security.rules.http.a]\non = \"http.\xff\"\n".to_vec(),
        _ => text.as_bytes().to_vec(),
    }
}

#[test]
fn malformed_profiles_are_rejected_with_their_place_and_problem() {
    assert!(CASES.len() >= 50);
    let mut failures = Vec::new();
    for (what, text, expected) in CASES {
        let actual = load(profile(text));
        if actual != *expected {
            failures.push(format!("{what}:\n  expected {expected}\n  actual   {actual}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
