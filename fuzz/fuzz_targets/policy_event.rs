//! Events as JSON (what `sandbox policy explain --event` reads) against a
//! loaded engine whose rules use every kind of condition: reading, deciding
//! and explaining must never panic, and explain must agree with decide.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use policy::{Engine, Event, Layer, ProfileSource, Secrets};

const RULES: &str = r#"
[security.rules.http.headers]
on = "http.request"
if = 'http.request.headers["x-a"] == "1" || http.request.headers.exists(h, h.startsWith("x-") && size(http.request.headers[h]) > 3)'
decision = "allow"
priority = 5

[security.rules.http.numbers]
on = "http.request"
if = 'int(http.request.headers["content-length"]) > 100 && double(http.request.query) < 2.5'
decision = "block"
priority = 1

[security.rules.http.regex]
on = "http.request"
if = 'http.request.path.matches("^/v[0-9]+/") && http.request.sni != http.request.host'
decision = "ask"

[security.rules.http.rewrite]
on = "http.request"
decision = "rewrite"
set_request_headers = { authorization = "Bearer ${secret:TOKEN}" }

[security.rules.http.fuzz_responses]
on = "http.response"
if = 'http.response.status >= 500 || http.response.headers.all(k, k.size() < 20) || http.request.path.contains("/x")'
decision = "allow"

[security.rules.dns.answer]
on = "dns.request"
if = 'dns.request.qname.endsWith(".internal")'
decision = "rewrite"
answer = { a = ["10.0.0.1"], aaaa = ["fd00::1"], txt = ["t"] }

[security.rules.dns.internal]
on = "dns.request"
if = 'dns.request.qname.endsWith(".internal") ? dns.request.qtype in ["A", "AAAA", "ANY"] : false'
decision = "allow"

[security.rules.tcp.ports]
on = "tcp.connect"
if = 'tcp.connect.port - 1 < 1023 && tcp.connect.ip.startsWith("10.") || uint(tcp.connect.port) == 22u'
decision = "allow"
"#;

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let dev = Engine::builder()
            .profile(Layer::Builtin, ProfileSource::Builtin("dev".into()))
            .profile(Layer::User, ProfileSource::Text { name: "fuzz.toml".into(), text: RULES.into() })
            .secrets(Secrets::none().with_value("TOKEN", "secret"))
            .build();
        dev.unwrap_or_else(|error| panic!("the fuzz engine must load: {error}"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    match Event::from_json(json) {
        Ok(event) => {
            let engine = engine();
            let verdict = engine.decide(&event);
            let explanation = engine.explain(&event);
            assert_eq!(explanation.verdict, verdict);
            let _ = explanation.to_string();
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
});
