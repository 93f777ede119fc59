//! Drift watch: re-checks every mirrored tag against its source and the target, records what moved or
//! went missing, and queues the jobs that follow or repair it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What to do when a source tag moves upstream after it was mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Mirror the tag's new digest (a drift record is kept of the move).
    #[default]
    Follow,
    /// Keep the mirrored digest; record the move and leave the tag on the target alone.
    Pin,
}

impl Policy {
    /// The name used in configuration, the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Follow => "follow",
            Policy::Pin => "pin",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "follow" => Ok(Policy::Follow),
            "pin" => Ok(Policy::Pin),
            other => Err(format!(
                "drift policy {other:?} is not known: use \"follow\" (mirror the new digest) or \"pin\" (keep the mirrored one)"
            )),
        }
    }
}
