//! Signed modules (issue 14 §3): a fleet key (Ed25519) signs a function
//! module's name, version and SHA-256; a gateway configured with trusted
//! keys runs only modules whose signature one of them made.
//!
//! The signature travels as `<module>.sig` next to the module (and later in
//! the rollout frame): JSON with the format, name, version, digest, the
//! signer's public key and the signature. What is signed is
//! `fogline-module-signature/1 \0 name \0 version \0 sha256-hex`, so a
//! signature cannot be moved to other bytes, another name or version.

use std::fmt;
use std::str::FromStr;

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The signature format this code writes and reads.
pub const FORMAT: &str = "fogline-module-signature/1";
/// First word of a key file.
const KEY_FILE_TAG: &str = "fogline-fleet-key/1";

/// Why a module's signature is not accepted (or a key not read).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// The `.sig` is not a signature this code reads.
    #[error("the signature is not a {FORMAT} document: {0}")]
    Format(String),
    /// The signature is for other bytes.
    #[error("the signature is for a module with SHA-256 {signed}, this one is {actual}: the file was changed after signing")]
    Content {
        /// The digest signed.
        signed: String,
        /// The module's digest.
        actual: String,
    },
    /// Made by a key the gateway does not trust.
    #[error(
        "signed by {key}, which is not among the {trusted} trusted key(s) ([modules] trusted_keys)"
    )]
    Untrusted {
        /// The signer.
        key: String,
        /// How many keys are trusted.
        trusted: usize,
    },
    /// The signature does not verify.
    #[error("the signature by {key} does not verify: the module's name, version or digest were changed, or the signature is damaged")]
    Invalid {
        /// The claimed signer.
        key: String,
    },
    /// A public key that is not `ed25519:<64 hex digits>`.
    #[error("`{0}` is not a public key (expected `ed25519:` and 64 hex digits)")]
    Key(String),
    /// A key file that is not one.
    #[error("not a fleet key file ({KEY_FILE_TAG} and a PKCS#8 key in hex): {0}")]
    KeyFile(String),
}

/// A fleet public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", to_hex(&self.0))
    }
}

impl FromStr for PublicKey {
    type Err = SignatureError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SignatureError::Key(s.chars().take(80).collect());
        let hex = s.trim().strip_prefix("ed25519:").ok_or_else(bad)?;
        let bytes = from_hex(hex).ok_or_else(bad)?;
        Ok(Self(bytes.try_into().map_err(|_| bad())?))
    }
}

/// A module's signature, as stored in `<module>.sig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSignature {
    /// [`FORMAT`].
    pub format: String,
    /// The module's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// SHA-256 of the module's bytes, hex.
    pub sha256: String,
    /// The signer's public key (`ed25519:...`).
    pub key: String,
    /// The Ed25519 signature, hex.
    pub signature: String,
}

impl ModuleSignature {
    /// Reads a `.sig` document.
    pub fn parse(text: &[u8]) -> Result<Self, SignatureError> {
        let s: Self =
            serde_json::from_slice(text).map_err(|e| SignatureError::Format(e.to_string()))?;
        if s.format != FORMAT {
            return Err(SignatureError::Format(format!(
                "format `{}`, this gateway reads `{FORMAT}`",
                s.format
            )));
        }
        Ok(s)
    }

    /// Checks that it covers `module` and was made by one of `trusted`.
    pub fn verify(&self, module: &[u8], trusted: &[PublicKey]) -> Result<(), SignatureError> {
        let actual = sha256_hex(module);
        if !self.sha256.eq_ignore_ascii_case(&actual) {
            return Err(SignatureError::Content {
                signed: self.sha256.clone(),
                actual,
            });
        }
        let key: PublicKey = self.key.parse()?;
        if !trusted.contains(&key) {
            return Err(SignatureError::Untrusted {
                key: self.key.clone(),
                trusted: trusted.len(),
            });
        }
        let invalid = || SignatureError::Invalid {
            key: self.key.clone(),
        };
        let sig = from_hex(&self.signature).ok_or_else(invalid)?;
        UnparsedPublicKey::new(&ED25519, key.0)
            .verify(&message(&self.name, &self.version, &actual), &sig)
            .map_err(|_| invalid())
    }
}

/// A fleet signing key.
pub struct SigningKey(Ed25519KeyPair);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public_key())
    }
}

impl SigningKey {
    /// A new key and its key-file text (keep it secret).
    pub fn generate() -> Result<(Self, String), SignatureError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|e| SignatureError::KeyFile(e.to_string()))?;
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|e| SignatureError::KeyFile(e.to_string()))?;
        let text = format!("{KEY_FILE_TAG} {}\n", to_hex(pkcs8.as_ref()));
        Ok((Self(key), text))
    }

    /// Reads a key file's text.
    pub fn from_file_text(text: &str) -> Result<Self, SignatureError> {
        let mut words = text.split_whitespace();
        if words.next() != Some(KEY_FILE_TAG) {
            return Err(SignatureError::KeyFile(format!(
                "it does not start with `{KEY_FILE_TAG}`"
            )));
        }
        let der = words
            .next()
            .and_then(from_hex)
            .ok_or_else(|| SignatureError::KeyFile("no hex key after the tag".into()))?;
        Ed25519KeyPair::from_pkcs8(&der)
            .map(Self)
            .map_err(|e| SignatureError::KeyFile(e.to_string()))
    }

    /// Its public key.
    pub fn public_key(&self) -> PublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.0.public_key().as_ref());
        PublicKey(k)
    }

    /// Signs `module` as `name` at `version`.
    pub fn sign(&self, name: &str, version: &str, module: &[u8]) -> ModuleSignature {
        let sha256 = sha256_hex(module);
        let sig = self.0.sign(&message(name, version, &sha256));
        ModuleSignature {
            format: FORMAT.to_string(),
            name: name.to_string(),
            version: version.to_string(),
            sha256,
            key: self.public_key().to_string(),
            signature: to_hex(sig.as_ref()),
        }
    }
}

fn message(name: &str, version: &str, sha256: &str) -> Vec<u8> {
    [FORMAT, name, version, &sha256.to_ascii_lowercase()]
        .join("\0")
        .into_bytes()
}

/// SHA-256, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    to_hex(&Sha256::digest(bytes))
}

fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 1 << 16 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_module_verifies_and_every_change_is_refused_with_its_reason() {
        let (key, text) = SigningKey::generate().unwrap();
        let again = SigningKey::from_file_text(&text).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        let trusted = [key.public_key()];
        let module = b"\0asm module bytes";
        let sig = key.sign("alert", "1.2.0", module);
        let text = serde_json::to_vec(&sig).unwrap();
        let parsed = ModuleSignature::parse(&text).unwrap();
        parsed.verify(module, &trusted).unwrap();
        assert_eq!(
            parsed.key.parse::<PublicKey>().unwrap().to_string(),
            parsed.key
        );
        // Other bytes.
        assert!(matches!(
            parsed.verify(b"\0asm other", &trusted),
            Err(SignatureError::Content { .. })
        ));
        // Another name or version, same digest: the signature no longer holds.
        let mut renamed = parsed.clone();
        renamed.version = "9.9.9".into();
        assert!(matches!(
            renamed.verify(module, &trusted),
            Err(SignatureError::Invalid { .. })
        ));
        // A key nobody trusts.
        let (other, _) = SigningKey::generate().unwrap();
        let foreign = other.sign("alert", "1.2.0", module);
        let e = foreign.verify(module, &trusted).unwrap_err();
        assert!(
            e.to_string().contains("not among the 1 trusted key(s)"),
            "{e}"
        );
        // A trusted key claimed, another key's signature.
        let mut forged = foreign.clone();
        forged.key = key.public_key().to_string();
        assert!(matches!(
            forged.verify(module, &trusted),
            Err(SignatureError::Invalid { .. })
        ));
        assert!(ModuleSignature::parse(b"{}").is_err());
        assert!("ed25519:zz".parse::<PublicKey>().is_err());
        assert!(SigningKey::from_file_text("nope").is_err());
    }
}
