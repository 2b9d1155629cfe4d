//! Who may connect to the endpoint: users with Argon2-hashed passwords from
//! the config, client certificates (identity = CN), or anonymous clients
//! when allowed. A client id belongs to the identity that created its
//! session; another identity cannot take it over.

use std::collections::HashMap;
use std::sync::Mutex;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::BrokerUser;

/// Checks that `phc` is an Argon2 PHC string (`$argon2id$v=19$...`).
pub fn check_hash(phc: &str) -> Result<(), String> {
    let h = PasswordHash::new(phc).map_err(|e| {
        format!("not a password hash ({e}); the config holds hashes, never passwords")
    })?;
    if !h.algorithm.as_str().starts_with("argon2") {
        return Err(format!(
            "uses {}, only Argon2 hashes are accepted",
            h.algorithm
        ));
    }
    Ok(())
}

/// Hashes a password for `[[broker.users]] password_hash`: Argon2id with a
/// random salt, 7 MiB and 5 passes (one of OWASP's equivalent settings; it
/// keeps a verification's memory small on a gateway).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| e.to_string())?;
    let params = argon2::Params::new(7 * 1024, 5, 1, None).map_err(|e| e.to_string())?;
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Why a CONNECT was refused: the MQTT 5 reason code (mapped to 3.1.1) and
/// what to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// MQTT 5 CONNACK reason code.
    pub code: u8,
    /// For the log (never sent: it would help an attacker).
    pub reason: String,
}

/// Authenticates CONNECTs.
pub struct Authenticator {
    users: HashMap<String, String>,
    allow_anonymous: bool,
    /// Users whose password verified, by SHA-256 of the password: a
    /// reconnecting sensor does not pay for Argon2 again (and no plaintext
    /// password is kept).
    verified: Mutex<HashMap<String, [u8; 32]>>,
    /// One Argon2 verification at a time: each needs ~19 MiB and tens of
    /// milliseconds; a CONNECT flood must not take the gateway's memory.
    argon: Semaphore,
}

impl Authenticator {
    /// From the config.
    pub fn new(users: &[BrokerUser], allow_anonymous: bool) -> Self {
        Self {
            users: users
                .iter()
                .map(|u| (u.name.clone(), u.password_hash.clone()))
                .collect(),
            allow_anonymous,
            verified: Mutex::new(HashMap::new()),
            argon: Semaphore::new(1),
        }
    }

    /// The identity owning the session: `user:<name>`, `cert:<cn>`, or
    /// `None` for an anonymous client.
    pub async fn check(
        &self,
        username: Option<&str>,
        password: Option<&str>,
        certificate_cn: Option<&str>,
    ) -> Result<Option<String>, Refusal> {
        if let (Some(user), false) = (username, self.users.is_empty()) {
            let Some(hash) = self.users.get(user) else {
                return Err(Refusal {
                    code: 0x86,
                    reason: format!("unknown user `{user}`"),
                });
            };
            let password = password.unwrap_or("");
            let fingerprint: [u8; 32] = Sha256::digest(password.as_bytes()).into();
            let cached =
                self.verified.lock().ok().and_then(|m| m.get(user).copied()) == Some(fingerprint);
            if !cached {
                let _permit = self.argon.acquire().await.map_err(|_| Refusal {
                    code: 0x88,
                    reason: "authenticator closed".into(),
                })?;
                let (hash, pw) = (hash.clone(), password.to_string());
                let ok = tokio::task::spawn_blocking(move || {
                    PasswordHash::new(&hash)
                        .map(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
                        .unwrap_or(false)
                })
                .await
                .unwrap_or(false);
                if !ok {
                    return Err(Refusal {
                        code: 0x86,
                        reason: format!("wrong password for user `{user}`"),
                    });
                }
                if let Ok(mut m) = self.verified.lock() {
                    m.insert(user.to_string(), fingerprint);
                }
            }
            return Ok(Some(format!("user:{user}")));
        }
        if let Some(cn) = certificate_cn {
            return Ok(Some(format!("cert:{cn}")));
        }
        if self.allow_anonymous {
            return Ok(None);
        }
        Err(Refusal {
            code: if username.is_some() || !self.users.is_empty() {
                0x86
            } else {
                0x87
            },
            reason: "no credentials and anonymous clients are not allowed".into(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn users_certificates_and_anonymous() {
        let hash = hash_password("s3cret").unwrap();
        check_hash(&hash).unwrap();
        assert!(
            check_hash("s3cret").is_err(),
            "a plaintext password is refused"
        );
        let users = vec![BrokerUser {
            name: "sensor".into(),
            password_hash: hash,
        }];
        let a = Authenticator::new(&users, false);
        assert_eq!(
            a.check(Some("sensor"), Some("s3cret"), None).await.unwrap(),
            Some("user:sensor".into())
        );
        // Cached the second time, same answer.
        assert!(a.check(Some("sensor"), Some("s3cret"), None).await.is_ok());
        assert_eq!(
            a.check(Some("sensor"), Some("nope"), None)
                .await
                .unwrap_err()
                .code,
            0x86
        );
        assert_eq!(
            a.check(Some("who"), Some("x"), None)
                .await
                .unwrap_err()
                .code,
            0x86
        );
        assert_eq!(a.check(None, None, None).await.unwrap_err().code, 0x86);
        assert_eq!(
            a.check(None, None, Some("s1")).await.unwrap(),
            Some("cert:s1".into())
        );
        let open = Authenticator::new(&[], true);
        assert_eq!(open.check(None, None, None).await.unwrap(), None);
    }
}
