//! The fleet page: `GET /` and its two files under `/ui/`, plain static
//! files from `cloud-sync/aggregator/ui/` compiled into the binary (no build
//! step, nothing fetched from elsewhere).
//!
//! **Invariant:** the page holds no data. Everything it shows it asks
//! `/api/v1` for, with the token its user types, so `auth::require` lets
//! these three paths through without one. This module knows nothing about
//! the store or the tokens.

use axum::http::header::{self, HeaderName, HeaderValue};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const STYLE_CSS: &str = include_str!("../../ui/style.css");

/// What the page may load and talk to: its own files and the API of the
/// origin that served it (the `data:` icon stops a `/favicon.ico` request).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// One static file: its type, revalidated on every load (a new binary
/// serves a new page), and never sniffed as another type.
fn file(body: &'static str, content_type: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        body,
    )
}

/// The routes of the page, for `router()` to merge.
pub(super) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async {
                (
                    [(
                        HeaderName::from_static("content-security-policy"),
                        HeaderValue::from_static(CSP),
                    )],
                    file(INDEX_HTML, "text/html; charset=utf-8"),
                )
            }),
        )
        .route(
            "/ui/app.js",
            get(|| async { file(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/ui/style.css",
            get(|| async { file(STYLE_CSS, "text/css; charset=utf-8") }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_what_this_module_serves() {
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("style.css", STYLE_CSS),
        ] {
            // No CDN, no web font: everything comes from the aggregator.
            for far in ["http://", "https://", "//cdn", "@import"] {
                let hits: Vec<&str> = text
                    .lines()
                    .filter(|l| l.contains(far) && !l.contains("www.w3.org/2000/svg"))
                    .collect();
                assert!(hits.is_empty(), "{name} refers to {far}: {hits:?}");
            }
        }
        assert!(INDEX_HTML.contains("src=\"/ui/app.js\""));
        assert!(INDEX_HTML.contains("href=\"/ui/style.css\""));
        // Data goes on the page as text only.
        assert!(
            [
                ".innerHTML",
                ".outerHTML",
                "insertAdjacentHTML",
                "document.write"
            ]
            .iter()
            .all(|f| !APP_JS.contains(f)),
            "app.js must insert API values with textContent"
        );
    }
}
