//! Profile text, as a user or an organisation could write it: loading must
//! either succeed or report errors, never panic or hang; a loaded engine must
//! decide and explain any event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy::{Engine, Event, Layer, ProfileSource, Secrets};

const EVENTS: [&str; 4] = [
    r#"{"event": "dns.request", "qname": "pypi.org", "qtype": "AAAA"}"#,
    r#"{"event": "http.request", "host": "github.com", "method": "POST", "path": "/a/b", "headers": {"x-a": "1"}}"#,
    r#"{"event": "http.response", "status": 404, "headers": {"etag": "x"}, "request": {"host": "x.org"}}"#,
    r#"{"event": "tcp.connect", "host": "db", "ip": "10.0.0.1", "port": 5432}"#,
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    let loaded = Engine::builder()
        .profile(Layer::User, ProfileSource::Text { name: "fuzz.toml".into(), text })
        .secrets(Secrets::none().with_value("TOKEN", "secret"))
        .build();
    match loaded {
        Ok(engine) => {
            let _ = engine.summary().to_string();
            for json in EVENTS {
                if let Ok(event) = Event::from_json(json) {
                    let verdict = engine.decide(&event);
                    let explanation = engine.explain(&event);
                    assert_eq!(explanation.verdict, verdict);
                    let _ = explanation.to_string();
                }
            }
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
});
