//! Bearer tokens for the HTTP API: no token, no data.
//!
//! A token is 32 random bytes, shown once as `fgl_<64 hex>` by
//! `fogline-cloud token new`; the aggregator keeps only its SHA-256 (the
//! tokens are random, so a fast hash is enough: nothing to brute-force) and
//! compares digests in constant time. Each has a scope: `read` (every GET)
//! or `admin` (also what changes state). `/healthz` and `/metrics` answer
//! without one only when `[http] open` lists them.
//!
//! Tokens come from `[[http.tokens]]` and from the file `[http]
//! tokens_file` names (same shape; `token new` appends to it), re-read when
//! it changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every GET.
    Read,
    /// Everything.
    Admin,
}

/// One token as configured: its name (for logs), scope and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who or what holds it (`grafana`, `ops`).
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    /// SHA-256 of the token, 64 hex digits.
    pub sha256: String,
}

/// The shape of a tokens file.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<TokenConfig>,
}

/// A token file or entry that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not the expected TOML.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, with line and key.
        message: String,
    },
    /// An entry's hash is not 64 hex digits.
    #[error("{place}: token {name:?}: sha256 must be 64 hex digits, got {len} characters")]
    BadHash {
        /// The file or `[[http.tokens]]`.
        place: String,
        /// The token's name.
        name: String,
        /// Length given.
        len: usize,
    },
    /// A token name used twice.
    #[error("token name {0:?} is already taken")]
    NameTaken(String),
}

/// The SHA-256 of `token`, hex.
pub fn digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new token, and its entry for `name` with `scope`.
pub fn new_token(name: &str, scope: Scope) -> (String, TokenConfig) {
    let bytes: [u8; 32] = rand::random();
    let token = format!(
        "fgl_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let entry = TokenConfig {
        name: name.to_string(),
        scope,
        sha256: digest(&token),
    };
    (token, entry)
}

fn check(entries: &[TokenConfig], place: &str) -> Result<(), TokenError> {
    for t in entries {
        if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::BadHash {
                place: place.to_string(),
                name: t.name.clone(),
                len: t.sha256.len(),
            });
        }
    }
    Ok(())
}

/// Reads a tokens file (a missing one holds no tokens).
pub fn read_file(path: &Path) -> Result<Vec<TokenConfig>, TokenError> {
    let shown = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(TokenError::Io {
                path: shown,
                source,
            })
        }
    };
    let file: TokensFile = toml::from_str(&text).map_err(|e| TokenError::Parse {
        path: shown.clone(),
        message: e.to_string(),
    })?;
    check(&file.tokens, &shown)?;
    Ok(file.tokens)
}

/// Adds `entry` to the tokens file at `path` (created, mode 0600), through
/// a temporary file and a rename.
pub fn append_file(path: &Path, entry: TokenConfig) -> Result<(), TokenError> {
    let io = |source| TokenError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut tokens = read_file(path)?;
    if tokens.iter().any(|t| t.name == entry.name) {
        return Err(TokenError::NameTaken(entry.name));
    }
    tokens.push(entry);
    let text = format!(
        "# API tokens of fogline-cloud: names, scopes and SHA-256 digests (the tokens\n\
         # themselves were shown once by `fogline-cloud token new`). Remove an entry to revoke it.\n{}",
        toml::to_string(&TokensFile { tokens }).map_err(|e| TokenError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?
    );
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("toml.tmp");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// Which paths answer without a token.
#[derive(Debug, Clone, Default)]
pub struct Open {
    /// `/healthz`.
    pub healthz: bool,
    /// `/metrics`.
    pub metrics: bool,
}

/// The tokens in force: the config's and the file's, the file re-read when
/// its modification time changes.
pub struct Tokens {
    inline: Vec<TokenConfig>,
    file: Option<PathBuf>,
    loaded: RwLock<(Option<SystemTime>, Vec<TokenConfig>)>,
    /// Paths without a token.
    pub open: Open,
}

impl Tokens {
    /// From `[[http.tokens]]` and `[http] tokens_file`; checks both now.
    pub fn new(
        inline: Vec<TokenConfig>,
        file: Option<PathBuf>,
        open: Open,
    ) -> Result<Self, TokenError> {
        check(&inline, "[[http.tokens]]")?;
        let tokens = Self {
            inline,
            file,
            loaded: RwLock::new((None, Vec::new())),
            open,
        };
        tokens.reload()?;
        Ok(tokens)
    }

    /// Re-reads the file if it changed. A file that breaks keeps the tokens
    /// read before (and says why).
    pub fn reload(&self) -> Result<bool, TokenError> {
        let Some(path) = &self.file else {
            return Ok(false);
        };
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if self.loaded.read().map(|l| l.0 == mtime).unwrap_or(false) && mtime.is_some() {
            return Ok(false);
        }
        let entries = read_file(path)?;
        if let Ok(mut l) = self.loaded.write() {
            *l = (mtime, entries);
        }
        Ok(true)
    }

    /// How many tokens are in force.
    pub fn count(&self) -> usize {
        self.inline.len() + self.loaded.read().map(|l| l.1.len()).unwrap_or(0)
    }

    /// The entry whose digest is `token`'s, compared in constant time.
    fn find(&self, token: &str) -> Option<TokenConfig> {
        let d = digest(token);
        let loaded = self.loaded.read().ok()?;
        self.inline
            .iter()
            .chain(loaded.1.iter())
            .find(|t| {
                use subtle::ConstantTimeEq;
                bool::from(t.sha256.to_ascii_lowercase().as_bytes().ct_eq(d.as_bytes()))
            })
            .cloned()
    }
}

fn refuse(status: StatusCode, message: String) -> Response {
    let mut r = (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"fogline\""),
        );
    }
    r
}

/// The token a request carries: `Authorization: Bearer <token>`.
fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The middleware: open paths pass; others need a token whose scope
/// covers the method.
pub async fn require(State(tokens): State<Arc<Tokens>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let open = (path == "/healthz" && tokens.open.healthz)
        || (path == "/metrics" && tokens.open.metrics)
        // The page itself holds no data: it asks for a token.
        || path == "/" || path.starts_with("/ui/");
    if open {
        return next.run(req).await;
    }
    let Some(token) = bearer(&req) else {
        let hint = if tokens.count() == 0 {
            "no API tokens are configured: make one with `fogline-cloud token new --config <cloud.toml> --name <who> --scope read`"
        } else {
            "send `Authorization: Bearer <token>`"
        };
        return refuse(
            StatusCode::UNAUTHORIZED,
            format!("{path} needs a bearer token: {hint}"),
        );
    };
    let Some(entry) = tokens.find(token) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "the bearer token is not one this aggregator knows (revoked, or from another fleet)"
                .into(),
        );
    };
    let needed = if req.method() == Method::GET || req.method() == Method::HEAD {
        Scope::Read
    } else {
        Scope::Admin
    };
    if entry.scope < needed {
        return refuse(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} has scope read; {} {path} needs admin",
                entry.name,
                req.method()
            ),
        );
    }
    next.run(req).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_is_found_by_its_digest_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t/api-tokens.toml");
        let (token, entry) = new_token("ops", Scope::Admin);
        assert!(token.starts_with("fgl_") && token.len() == 68);
        append_file(&file, entry.clone()).unwrap();
        assert!(matches!(
            append_file(&file, entry),
            Err(TokenError::NameTaken(n)) if n == "ops"
        ));
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains(&token), "only the digest is kept");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let tokens = Tokens::new(Vec::new(), Some(file.clone()), Open::default()).unwrap();
        assert_eq!(tokens.find(&token).unwrap().scope, Scope::Admin);
        assert!(tokens.find("fgl_00").is_none());
        // A second token appended is seen after a reload.
        let (t2, e2) = new_token("grafana", Scope::Read);
        std::thread::sleep(std::time::Duration::from_millis(20));
        append_file(&file, e2).unwrap();
        tokens.reload().unwrap();
        assert_eq!(tokens.count(), 2);
        assert_eq!(tokens.find(&t2).unwrap().name, "grafana");
    }

    #[test]
    fn a_bad_digest_is_refused_with_its_place() {
        let bad = vec![TokenConfig {
            name: "x".into(),
            scope: Scope::Read,
            sha256: "abc".into(),
        }];
        let err = Tokens::new(bad, None, Open::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("[[http.tokens]]")
                && err.contains("\"x\"")
                && err.contains("3 characters"),
            "{err}"
        );
    }
}
