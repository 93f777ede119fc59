//! Content digests (`sha256:…`): parsing per the OCI grammar, hashing, verification.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// A digest algorithm we can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256, 64 hex characters.
    Sha256,
    /// SHA-512, 128 hex characters.
    Sha512,
}

impl Algorithm {
    fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// No `algorithm:` part.
    #[error("{input:?} has no algorithm; a digest looks like sha256:<64 lowercase hex characters>")]
    MissingAlgorithm { input: String },
    /// The algorithm part is not grammatical.
    #[error("{algorithm:?} is not a valid digest algorithm name; use sha256")]
    InvalidAlgorithm { algorithm: String },
    /// A grammatical but unsupported algorithm.
    #[error("digest algorithm {algorithm:?} is not supported; use sha256 (or sha512)")]
    UnsupportedAlgorithm { algorithm: String },
    /// The hex part has the wrong length.
    #[error("a {algorithm} digest has {expected} hex characters, this one has {actual}")]
    WrongLength {
        algorithm: &'static str,
        expected: usize,
        actual: usize,
    },
    /// The hex part has characters other than `0-9a-f`.
    #[error("the hex part of {input:?} must be lowercase hexadecimal (0-9, a-f)")]
    NotLowercaseHex { input: String },
    /// Content did not hash to the digest.
    #[error("digest mismatch: expected {expected}, the content hashes to {actual}")]
    Mismatch { expected: Digest, actual: Digest },
}

/// A content digest: algorithm and lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// Parses `algorithm:hex` per the OCI grammar; only sha256 and sha512 are accepted.
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| DigestError::MissingAlgorithm {
                input: s.to_string(),
            })?;
        let grammatical = !alg.is_empty()
            && alg.split(['+', '.', '_', '-']).all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
        if !grammatical {
            return Err(DigestError::InvalidAlgorithm {
                algorithm: alg.to_string(),
            });
        }
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => {
                return Err(DigestError::UnsupportedAlgorithm {
                    algorithm: other.to_string(),
                });
            }
        };
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::NotLowercaseHex {
                input: s.to_string(),
            });
        }
        if hex.len() != algorithm.hex_len() {
            return Err(DigestError::WrongLength {
                algorithm: algorithm.name(),
                expected: algorithm.hex_len(),
                actual: hex.len(),
            });
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_string(),
        })
    }

    /// The digest of `bytes` with `algorithm`.
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut h = DigestHasher::new(algorithm);
        h.update(bytes);
        h.finish()
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Digest::of(Algorithm::Sha256, bytes)
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lowercase hex part.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// `sha256:0123456789ab`, for logs.
    pub fn short(&self) -> String {
        format!("{}:{}", self.algorithm.name(), &self.hex[..12])
    }

    /// Checks that `bytes` hash to this digest.
    pub fn verify(&self, bytes: &[u8]) -> Result<(), DigestError> {
        let actual = Digest::of(self.algorithm, bytes);
        if &actual == self {
            Ok(())
        } else {
            Err(DigestError::Mismatch {
                expected: self.clone(),
                actual,
            })
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Hashes streamed content.
pub enum DigestHasher {
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// SHA-512 state.
    Sha512(sha2::Sha512),
}

impl DigestHasher {
    /// A hasher for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => DigestHasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => DigestHasher::Sha512(sha2::Sha512::new()),
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            DigestHasher::Sha256(h) => h.update(bytes),
            DigestHasher::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        match self {
            DigestHasher::Sha256(h) => Digest {
                algorithm: Algorithm::Sha256,
                hex: hex::encode(h.finalize()),
            },
            DigestHasher::Sha512(h) => Digest {
                algorithm: Algorithm::Sha512,
                hex: hex::encode(h.finalize()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_hashes_and_verifies() {
        let d = Digest::parse(EMPTY).unwrap();
        assert_eq!(d, Digest::sha256_of(b""));
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d.short(), "sha256:e3b0c44298fc");
        assert!(d.verify(b"").is_ok());
        assert!(matches!(d.verify(b"x"), Err(DigestError::Mismatch { .. })));
        let s512 = Digest::of(Algorithm::Sha512, b"");
        assert_eq!(Digest::parse(&s512.to_string()).unwrap(), s512);
    }

    #[test]
    fn refuses_bad_digests_saying_why() {
        let cases = [
            ("e3b0", "no algorithm"),
            ("md5:d41d8cd98f00b204e9800998ecf8427e", "not supported"),
            ("SHA256:abc", "not a valid digest algorithm"),
            ("sha256:abc", "64 hex characters, this one has 3"),
            (
                &EMPTY.to_uppercase().replace("SHA256", "sha256"),
                "lowercase",
            ),
            ("sha256:", "64 hex characters, this one has 0"),
        ];
        for (input, want) in cases {
            let e = Digest::parse(input).unwrap_err().to_string();
            assert!(e.contains(want), "{input}: {e}");
        }
    }
}
