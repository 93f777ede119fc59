//! Content digests (`sha256:…`): parsing per the OCI grammar, hashing (whole or streamed) and
//! verification. Everything that names content by hash goes through [`Digest`], so a digest that
//! got past [`Digest::parse`] is well formed and can be compared byte for byte.

use std::fmt;
use std::io;
use std::str::FromStr;

use sha2::Digest as _;

/// What a valid digest looks like, for error messages.
const VALID_FORM: &str = "a valid digest is \"sha256:\" followed by 64 lowercase hex characters (or \"sha512:\" and 128)";

/// A digest algorithm we can compute and verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256: 64 hex characters. What registries use.
    Sha256,
    /// SHA-512: 128 hex characters.
    Sha512,
}

impl Algorithm {
    /// The name used in digests: `sha256` or `sha512`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// How many hex characters the encoded part has.
    pub const fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a digest, or why content does not match one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The string is empty.
    #[error("the digest is empty; {VALID_FORM}")]
    Empty,
    /// There is no `algorithm:` prefix.
    #[error("digest {input:?} has no algorithm prefix (no ':'); {VALID_FORM}")]
    MissingAlgorithm {
        /// The whole string given as a digest.
        input: String,
    },
    /// The algorithm is not `[a-z0-9]+([+._-][a-z0-9]+)*`.
    #[error(
        "digest algorithm {algorithm:?} is not a valid algorithm name (lowercase letters and digits, \
         optionally joined by '+', '.', '_' or '-'); {VALID_FORM}"
    )]
    InvalidAlgorithm {
        /// The text before the first ':'.
        algorithm: String,
    },
    /// A grammatical algorithm other than sha256 and sha512.
    #[error("digest algorithm {algorithm:?} is not supported; {VALID_FORM}")]
    UnsupportedAlgorithm {
        /// The algorithm name as given.
        algorithm: String,
    },
    /// The encoded part has characters other than `0-9a-f` (uppercase hex included).
    #[error(
        "the hex part of digest {input:?} has characters other than 0-9 and a-f \
         (hex must be lowercase); {VALID_FORM}"
    )]
    NotLowercaseHex {
        /// The whole string given as a digest.
        input: String,
    },
    /// The encoded part has the wrong number of characters for its algorithm.
    #[error(
        "the hex part of this {algorithm} digest has {actual} characters, it must have exactly \
         {expected}; {VALID_FORM}"
    )]
    WrongLength {
        /// The (supported) algorithm named by the digest.
        algorithm: Algorithm,
        /// How many hex characters that algorithm has.
        expected: usize,
        /// How many were given.
        actual: usize,
    },
    /// Content does not hash to the digest it was expected to have.
    #[error(
        "digest mismatch: expected {expected}, but the content hashes to {actual}; the content is \
         corrupt or is not what was asked for"
    )]
    Mismatch {
        /// The digest the content should have.
        expected: Digest,
        /// The digest the content has.
        actual: Digest,
    },
}

/// A content digest: an algorithm and the lowercase hex of the hash.
///
/// Displays, serialises and parses as `sha256:<64 hex>`. Ordering is by algorithm, then hex.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// Parses `algorithm:hex` per the OCI image spec grammar; only sha256 and sha512 are accepted,
    /// with exactly 64 or 128 lowercase hex characters.
    pub fn parse(input: &str) -> Result<Digest, DigestError> {
        if input.is_empty() {
            return Err(DigestError::Empty);
        }
        let (name, encoded) =
            input
                .split_once(':')
                .ok_or_else(|| DigestError::MissingAlgorithm {
                    input: input.to_string(),
                })?;
        if !algorithm_is_grammatical(name) {
            return Err(DigestError::InvalidAlgorithm {
                algorithm: name.to_string(),
            });
        }
        let algorithm = match name {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => {
                return Err(DigestError::UnsupportedAlgorithm {
                    algorithm: other.to_string(),
                });
            }
        };
        if !encoded
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::NotLowercaseHex {
                input: input.to_string(),
            });
        }
        if encoded.len() != algorithm.hex_len() {
            return Err(DigestError::WrongLength {
                algorithm,
                expected: algorithm.hex_len(),
                actual: encoded.len(),
            });
        }
        Ok(Digest {
            algorithm,
            hex: encoded.to_string(),
        })
    }

    /// The digest of `bytes` under `algorithm`.
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut hasher = DigestHasher::new(algorithm);
        hasher.update(bytes);
        hasher.finish()
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Digest::of(Algorithm::Sha256, bytes)
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lowercase hex of the hash, without the `algorithm:` prefix.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The algorithm and the first 12 hex characters (`sha256:0123456789ab`), for logs.
    pub fn short(&self) -> String {
        format!("{}:{}", self.algorithm, &self.hex[..12])
    }

    /// Checks that `bytes` hash to this digest; [`DigestError::Mismatch`] if they do not.
    pub fn verify(&self, bytes: &[u8]) -> Result<(), DigestError> {
        let actual = Digest::of(self.algorithm, bytes);
        if actual == *self {
            Ok(())
        } else {
            Err(DigestError::Mismatch {
                expected: self.clone(),
                actual,
            })
        }
    }
}

/// `[a-z0-9]+([+._-][a-z0-9]+)*`
fn algorithm_is_grammatical(name: &str) -> bool {
    name.split(['+', '.', '_', '-']).all(|part| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Digest::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Hashes content fed in pieces (a blob streamed from a registry) and yields its [`Digest`].
///
/// Also an [`io::Write`], so `io::copy(&mut reader, &mut hasher)` works.
#[derive(Clone)]
pub struct DigestHasher {
    state: HasherState,
}

#[derive(Clone)]
enum HasherState {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl DigestHasher {
    /// A hasher for `algorithm`, with nothing fed yet.
    pub fn new(algorithm: Algorithm) -> Self {
        let state = match algorithm {
            Algorithm::Sha256 => HasherState::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => HasherState::Sha512(sha2::Sha512::new()),
        };
        DigestHasher { state }
    }

    /// The algorithm this hasher computes.
    pub fn algorithm(&self) -> Algorithm {
        match self.state {
            HasherState::Sha256(_) => Algorithm::Sha256,
            HasherState::Sha512(_) => Algorithm::Sha512,
        }
    }

    /// Feeds the next bytes of the content.
    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.state {
            HasherState::Sha256(h) => h.update(bytes),
            HasherState::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        let (algorithm, hex) = match self.state {
            HasherState::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            HasherState::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest { algorithm, hex }
    }
}

impl fmt::Debug for DigestHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DigestHasher({})", self.algorithm())
    }
}

impl io::Write for DigestHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sha256 of the empty string.
    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    /// sha512 of the empty string.
    const EMPTY_SHA512: &str = "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e";

    #[test]
    fn hashes_known_values() {
        assert_eq!(Digest::sha256_of(b"").to_string(), EMPTY_SHA256);
        assert_eq!(Digest::of(Algorithm::Sha512, b"").to_string(), EMPTY_SHA512);
        assert_eq!(
            Digest::sha256_of(b"abc").hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn parses_and_displays_both_algorithms() {
        for text in [EMPTY_SHA256, EMPTY_SHA512] {
            let d = Digest::parse(text).unwrap();
            assert_eq!(d.to_string(), text);
            assert_eq!(text.parse::<Digest>().unwrap(), d);
        }
        let d = Digest::parse(EMPTY_SHA256).unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.hex(), &EMPTY_SHA256[7..]);
        assert_eq!(d.short(), "sha256:e3b0c44298fc");
        assert_eq!(format!("{d:?}"), format!("Digest({EMPTY_SHA256})"));
        assert_eq!(
            Digest::parse(EMPTY_SHA512).unwrap().algorithm(),
            Algorithm::Sha512
        );
    }

    #[test]
    fn streaming_equals_one_shot() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            let mut hasher = DigestHasher::new(algorithm);
            assert_eq!(hasher.algorithm(), algorithm);
            for chunk in data.chunks(777) {
                hasher.update(chunk);
            }
            assert_eq!(hasher.finish(), Digest::of(algorithm, &data));

            let mut hasher = DigestHasher::new(algorithm);
            io::copy(&mut &data[..], &mut hasher).unwrap();
            assert_eq!(hasher.finish(), Digest::of(algorithm, &data));
        }
    }

    #[test]
    fn verify_reports_both_digests() {
        let d = Digest::sha256_of(b"hello");
        assert_eq!(d.verify(b"hello"), Ok(()));
        let err = d.verify(b"hellO").unwrap_err();
        assert_eq!(
            err,
            DigestError::Mismatch {
                expected: d.clone(),
                actual: Digest::sha256_of(b"hellO"),
            }
        );
        let msg = err.to_string();
        assert!(msg.contains(&d.to_string()), "{msg}");
        assert!(
            msg.contains(&Digest::sha256_of(b"hellO").to_string()),
            "{msg}"
        );
    }

    #[test]
    fn serde_as_string() {
        let d = Digest::parse(EMPTY_SHA256).unwrap();
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{EMPTY_SHA256}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        let err = serde_json::from_str::<Digest>("\"sha256:abc\"").unwrap_err();
        assert!(err.to_string().contains("exactly 64"), "{err}");
    }

    #[test]
    fn ordering_is_by_algorithm_then_hex() {
        let a = Digest::parse(&format!("sha256:{}", "0".repeat(64))).unwrap();
        let b = Digest::parse(&format!("sha256:{}", "f".repeat(64))).unwrap();
        let c = Digest::parse(&format!("sha512:{}", "0".repeat(128))).unwrap();
        let mut v = vec![c.clone(), b.clone(), a.clone()];
        v.sort();
        assert_eq!(v, vec![a, b, c]);
    }

    /// Which variant an invalid input must produce.
    type Expect = fn(&DigestError) -> bool;

    #[test]
    fn refuses_bad_digests_saying_why() {
        let upper = EMPTY_SHA256.to_uppercase().replace("SHA256", "sha256");
        let cases: Vec<(String, Expect, &str)> = vec![
            ("".into(), |e| matches!(e, DigestError::Empty), "empty"),
            (
                EMPTY_SHA256[7..].into(),
                |e| matches!(e, DigestError::MissingAlgorithm { .. }),
                "no algorithm",
            ),
            (
                ":abc".into(),
                |e| matches!(e, DigestError::InvalidAlgorithm { .. }),
                "not a valid algorithm",
            ),
            (
                "SHA256:abc".into(),
                |e| matches!(e, DigestError::InvalidAlgorithm { .. }),
                "\"SHA256\"",
            ),
            (
                "sha256+:abc".into(),
                |e| matches!(e, DigestError::InvalidAlgorithm { .. }),
                "not a valid algorithm",
            ),
            (
                "md5:d41d8cd98f00b204e9800998ecf8427e".into(),
                |e| matches!(e, DigestError::UnsupportedAlgorithm { algorithm } if algorithm == "md5"),
                "not supported",
            ),
            (
                "sha384:abc".into(),
                |e| matches!(e, DigestError::UnsupportedAlgorithm { .. }),
                "\"sha384\"",
            ),
            (
                "sha256:abc".into(),
                |e| {
                    matches!(
                        e,
                        DigestError::WrongLength {
                            algorithm: Algorithm::Sha256,
                            expected: 64,
                            actual: 3
                        }
                    )
                },
                "has 3 characters, it must have exactly 64",
            ),
            (
                "sha256:".into(),
                |e| matches!(e, DigestError::WrongLength { actual: 0, .. }),
                "has 0 characters",
            ),
            (
                format!("sha512:{}", &EMPTY_SHA256[7..]),
                |e| {
                    matches!(
                        e,
                        DigestError::WrongLength {
                            expected: 128,
                            actual: 64,
                            ..
                        }
                    )
                },
                "exactly 128",
            ),
            (
                upper,
                |e| matches!(e, DigestError::NotLowercaseHex { .. }),
                "lowercase",
            ),
            (
                format!("sha256:{}g", &EMPTY_SHA256[8..]),
                |e| matches!(e, DigestError::NotLowercaseHex { .. }),
                "other than 0-9 and a-f",
            ),
            (
                format!("{EMPTY_SHA256}\n"),
                |e| matches!(e, DigestError::NotLowercaseHex { .. }),
                "lowercase",
            ),
            (
                format!("sha256:{}:0", &EMPTY_SHA256[9..]),
                |e| matches!(e, DigestError::NotLowercaseHex { .. }),
                "lowercase",
            ),
        ];
        for (input, is_expected, fragment) in cases {
            let err = Digest::parse(&input).unwrap_err();
            assert!(is_expected(&err), "{input:?}: unexpected {err:?}");
            let msg = err.to_string();
            assert!(msg.contains(fragment), "{input:?}: {msg}");
            if !matches!(err, DigestError::Mismatch { .. }) {
                assert!(msg.contains("a valid digest is"), "{input:?}: {msg}");
            }
        }
    }
}
