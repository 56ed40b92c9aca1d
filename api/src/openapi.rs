//! The OpenAPI 3.1 document of the native endpoints, generated from the
//! handlers' annotations. It is committed as `api/openapi.json`; a test
//! fails when the two differ (`UPDATE_OPENAPI=1 cargo test -p api --lib`
//! rewrites the file).

use utoipa::openapi::security::{ApiKey as ApiKeyScheme, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{events, exec, files, meta, policy, ports, sandboxes, snapshots};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sandbox",
        description = "Native HTTP API of the sandbox microVM runtime (`sandbox serve`). Every error has the shape of `ErrorBody`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    paths(
        meta::health,
        meta::version,
        sandboxes::create,
        sandboxes::list,
        sandboxes::get_one,
        sandboxes::delete,
        sandboxes::fork,
        exec::exec,
        exec::exec_stream,
        files::upload,
        files::download,
        events::events,
        events::events_stream,
        ports::create,
        ports::list,
        snapshots::create,
        snapshots::list,
        policy::check,
        policy::explain,
        policy::sandbox_profile,
    ),
    components(schemas(crate::ErrorBody)),
    modifiers(&Security),
    security(("bearer" = []), ("api_key" = [])),
    tags(
        (name = "meta", description = "The server itself"),
        (name = "sandboxes", description = "Start, list, drive and delete sandboxes"),
        (name = "files", description = "Files into and out of a sandbox"),
        (name = "events", description = "What a sandbox's guest tried to reach, and connections into it (its session.db)"),
        (name = "ports", description = "Port forwards from the host into a sandbox"),
        (name = "snapshots", description = "Named snapshots, and sandboxes restored from them"),
        (name = "policy", description = "Check profiles, explain decisions, a sandbox's profiles"),
    )
)]
struct ApiDoc;

/// The two ways to present the API key.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKeyScheme::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// The document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// The document as the committed file holds it (pretty JSON, a final newline).
pub fn openapi_text() -> String {
    let mut text = openapi().to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_committed_openapi_json_is_the_generated_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
        let generated = super::openapi_text();
        if std::env::var_os("UPDATE_OPENAPI").is_some_and(|v| v == "1") {
            std::fs::write(&path, &generated).expect("write api/openapi.json");
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "api/openapi.json differs from the document the code generates; \
             regenerate it with `UPDATE_OPENAPI=1 cargo test -p api --lib openapi` and commit it"
        );
        assert!(generated.contains("\"openapi\": \"3.1.0\""), "not OpenAPI 3.1");
    }
}
