//! Who may connect to the endpoint: users with Argon2-hashed passwords from
//! the config, client certificates (identity = CN), or anonymous clients
//! when allowed. A client id belongs to the identity that created its
//! session; another identity cannot take it over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
///
/// Password checks cost the same for a user that does not exist (a dummy
/// hash with the users' parameters is verified and fails), so user names
/// cannot be found by timing; they run `workers` at a time on blocking
/// threads, with at most `queue` CONNECTs waiting — beyond, the CONNECT is
/// refused at once as busy (0x89), never queued without bound.
pub struct Authenticator {
    users: HashMap<String, String>,
    allow_anonymous: bool,
    /// Users whose password verified, by SHA-256 of the password: a
    /// reconnecting sensor does not pay for Argon2 again (and no plaintext
    /// password is kept).
    verified: Mutex<HashMap<String, [u8; 32]>>,
    /// Verifications running at once: each needs several MiB and tens of
    /// milliseconds; a CONNECT flood must not take the gateway's memory.
    argon: Arc<Semaphore>,
    /// Verifications admitted (running or waiting) and the most there may be.
    admitted: AtomicUsize,
    max_admitted: usize,
    /// Verified in place of an unknown user's hash.
    dummy: String,
    /// Dummy verifications done (for tests and the curious).
    dummy_checks: AtomicU64,
}

/// A hash of a random password with the same algorithm and parameters as
/// `like` (the first user's), so verifying against it costs what a real
/// user's verification costs.
fn dummy_hash(like: Option<&str>) -> String {
    let password: [u8; 16] = rand::random();
    let built = like
        .and_then(|phc| PasswordHash::new(phc).ok())
        .and_then(|h| {
            let alg = argon2::Algorithm::try_from(h.algorithm).ok()?;
            let version = h
                .version
                .and_then(|v| argon2::Version::try_from(v).ok())
                .unwrap_or_default();
            let params = argon2::Params::try_from(&h).ok()?;
            let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).ok()?;
            Argon2::new(alg, version, params)
                .hash_password(&password, &salt)
                .ok()
                .map(|h| h.to_string())
        });
    built
        .or_else(|| hash_password(&String::from_utf8_lossy(&password)).ok())
        .unwrap_or_default()
}

/// Gives back an admitted verification's place.
struct Admitted<'a>(&'a AtomicUsize);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Authenticator {
    /// From the config: `workers` verifications at once, `queue` waiting.
    pub fn new(users: &[BrokerUser], allow_anonymous: bool, workers: usize, queue: usize) -> Self {
        let workers = workers.max(1);
        Self {
            users: users
                .iter()
                .map(|u| (u.name.clone(), u.password_hash.clone()))
                .collect(),
            allow_anonymous,
            verified: Mutex::new(HashMap::new()),
            argon: Arc::new(Semaphore::new(workers)),
            admitted: AtomicUsize::new(0),
            max_admitted: workers.saturating_add(queue),
            dummy: if users.is_empty() {
                String::new()
            } else {
                dummy_hash(users.first().map(|u| u.password_hash.as_str()))
            },
            dummy_checks: AtomicU64::new(0),
        }
    }

    /// Unknown users checked against the dummy hash so far.
    pub fn dummy_verifications(&self) -> u64 {
        self.dummy_checks.load(Ordering::Relaxed)
    }

    /// Verifies `password` against `hash` on the bounded pool, or refuses
    /// at once as busy when `workers + queue` verifications are admitted.
    async fn verify(&self, hash: &str, password: &str) -> Result<bool, Refusal> {
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_admitted).then_some(n + 1)
            })
            .map_err(|n| Refusal {
                code: 0x89,
                reason: format!(
                    "{n} password checks running or waiting (broker.auth_workers + broker.auth_queue = {})",
                    self.max_admitted
                ),
            })?;
        let _admitted = Admitted(&self.admitted);
        let _permit = self
            .argon
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Refusal {
                code: 0x88,
                reason: "authenticator closed".into(),
            })?;
        let (hash, pw) = (hash.to_string(), password.to_string());
        Ok(tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false))
    }

    /// The identity owning the session: `user:<name>`, `cert:<cn>`, or
    /// `None` for an anonymous client.
    ///
    /// # Cancel safety
    /// Cancelling gives the verification's place back; a verification
    /// already on a blocking thread finishes there, unobserved.
    pub async fn check(
        &self,
        username: Option<&str>,
        password: Option<&str>,
        certificate_cn: Option<&str>,
    ) -> Result<Option<String>, Refusal> {
        if let (Some(user), false) = (username, self.users.is_empty()) {
            let password = password.unwrap_or("");
            let Some(hash) = self.users.get(user) else {
                // Pay what a known user pays, then refuse the same way.
                self.dummy_checks.fetch_add(1, Ordering::Relaxed);
                let _ = self.verify(&self.dummy, password).await?;
                return Err(Refusal {
                    code: 0x86,
                    reason: format!("unknown user `{user}`"),
                });
            };
            let fingerprint: [u8; 32] = Sha256::digest(password.as_bytes()).into();
            let cached =
                self.verified.lock().ok().and_then(|m| m.get(user).copied()) == Some(fingerprint);
            if !cached {
                if !self.verify(hash, password).await? {
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
        let a = Authenticator::new(&users, false, 1, 8);
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
        let open = Authenticator::new(&[], true, 1, 8);
        assert_eq!(open.check(None, None, None).await.unwrap(), None);
    }

    /// I-34: an unknown user costs a verification against the dummy hash,
    /// like a known one with a wrong password, and is refused the same way.
    #[tokio::test]
    async fn unknown_users_pay_for_a_dummy_verification() {
        let users = vec![BrokerUser {
            name: "sensor".into(),
            password_hash: hash_password("s3cret").unwrap(),
        }];
        let a = Authenticator::new(&users, false, 1, 8);
        check_hash(&a.dummy).unwrap();
        assert_eq!(
            PasswordHash::new(&a.dummy).unwrap().params,
            PasswordHash::new(&users[0].password_hash).unwrap().params,
            "the dummy costs what a user's hash costs"
        );
        let unknown = a.check(Some("who"), Some("x"), None).await.unwrap_err();
        let wrong = a.check(Some("sensor"), Some("x"), None).await.unwrap_err();
        assert_eq!(a.dummy_verifications(), 1);
        assert_eq!(unknown.code, wrong.code);
    }

    /// I-34: verifications beyond workers + queue are refused as busy at
    /// once (0x89; MQTT 3.1.1 maps it to 3, server unavailable).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_as_busy() {
        let users = vec![BrokerUser {
            name: "sensor".into(),
            password_hash: hash_password("s3cret").unwrap(),
        }];
        let a = Arc::new(Authenticator::new(&users, false, 1, 2));
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let a = a.clone();
                tokio::spawn(async move {
                    a.check(Some("sensor"), Some(&format!("wrong{i}")), None)
                        .await
                        .unwrap_err()
                        .code
                })
            })
            .collect();
        let mut codes = Vec::new();
        for t in tasks {
            codes.push(t.await.unwrap());
        }
        let busy = codes.iter().filter(|c| **c == 0x89).count();
        let checked = codes.iter().filter(|c| **c == 0x86).count();
        assert!(busy >= 9 && checked >= 1, "{codes:x?}");
        assert_eq!(busy + checked, 12);
        assert_eq!(a.admitted.load(Ordering::Acquire), 0, "places given back");
    }
}
