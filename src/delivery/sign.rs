//! Standard Webhooks signatures.
//!
//! The signed content is `{webhook-id}.{webhook-timestamp}.{body}`; each
//! secret (`whsec_` + base64 key) gives one `v1,<base64 HMAC-SHA256>` entry,
//! and the entries are joined by spaces in `webhook-signature`, so a secret
//! can be rotated by sending both the old and the new one for a while.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A set of signing keys, parsed from space-separated `whsec_…` secrets.
/// Its `Debug` output never shows the keys.
#[derive(Clone, PartialEq, Eq)]
pub struct Secrets(Vec<Vec<u8>>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} redacted)", self.0.len())
    }
}

/// A secret that is not `whsec_` followed by base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secret #{position} is not of the form whsec_<base64 key>: {problem}")]
pub struct SecretError {
    /// 1-based position of the bad secret in the list.
    pub position: usize,
    /// What is wrong (never the secret itself).
    pub problem: &'static str,
}

impl Secrets {
    /// A fresh secret, `whsec_` and 32 random bytes from the operating
    /// system's generator, base64-encoded.
    pub fn generate() -> String {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the operating system's random generator");
        format!("whsec_{}", B64.encode(key))
    }

    /// Parses one or more space-separated `whsec_…` secrets.
    pub fn parse(list: &str) -> Result<Self, SecretError> {
        let mut keys = Vec::new();
        for (i, s) in list.split_whitespace().enumerate() {
            let position = i + 1;
            let b64 = s.strip_prefix("whsec_").ok_or(SecretError {
                position,
                problem: "missing the whsec_ prefix",
            })?;
            let key = B64.decode(b64).map_err(|_| SecretError {
                position,
                problem: "the key is not valid base64",
            })?;
            if key.is_empty() {
                return Err(SecretError {
                    position,
                    problem: "the key is empty",
                });
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(SecretError {
                position: 1,
                problem: "no secret given",
            });
        }
        Ok(Secrets(keys))
    }

    /// How many secrets (signatures per request).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a parsed set holds at least one secret.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `webhook-signature` header value for this message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut out = String::with_capacity(self.0.len() * 48);
        for key in &self.0 {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str("v1,");
            out.push_str(&B64.encode(mac(key, id, timestamp, body)));
        }
        out
    }

    /// Verifies a `webhook-signature` header: true when any `v1` entry
    /// matches any of these secrets (constant-time comparison).
    pub fn verify(&self, id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
        header
            .split_whitespace()
            .filter_map(|e| e.strip_prefix("v1,"))
            .any(|sig| {
                let Ok(sig) = B64.decode(sig) else { return false };
                self.0.iter().any(|key| {
                    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
                    feed(&mut m, id, timestamp, body);
                    m.verify_slice(&sig).is_ok()
                })
            })
    }
}

type HmacSha256 = Hmac<Sha256>;

fn feed(m: &mut HmacSha256, id: &str, timestamp: i64, body: &[u8]) {
    m.update(id.as_bytes());
    m.update(b".");
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
}

fn mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    feed(&mut m, id, timestamp, body);
    m.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The known-answer vector published with the Standard Webhooks libraries.
    #[test]
    fn standard_webhooks_known_answer() {
        let s = Secrets::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = s.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(s.verify(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
            &sig
        ));
        assert!(!s.verify(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265331,
            br#"{"test": 2432232314}"#,
            &sig
        ));
    }

    #[test]
    fn rotation_signs_with_every_secret() {
        let s = Secrets::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw  whsec_c2Vjb25k").unwrap();
        let sig = s.sign("id", 1, b"{}");
        let parts: Vec<_> = sig.split(' ').collect();
        assert_eq!(parts.len(), 2);
        let second = Secrets::parse("whsec_c2Vjb25k").unwrap();
        assert!(second.verify("id", 1, b"{}", &sig));
        assert_eq!(parts[1], second.sign("id", 1, b"{}"));
    }

    #[test]
    fn bad_secrets_are_named_by_position_not_content() {
        let e = Secrets::parse("whsec_c2Vjb25k nope").unwrap_err();
        assert_eq!(e.position, 2);
        assert!(!e.to_string().contains("nope"));
        assert!(Secrets::parse("whsec_!!!").is_err());
        assert!(Secrets::parse("").is_err());
        assert!(!format!("{:?}", Secrets::parse("whsec_c2Vjb25k").unwrap()).contains("c2Vjb25k"));
    }
}
