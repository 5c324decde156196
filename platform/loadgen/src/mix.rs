//! What the load's orders are placed to do: the outcomes, and their mix over a run.

use serde::Serialize;

/// What an order is placed to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Paid with an approving card and verified at once: `COMPLETED`.
    Succeed,
    /// Paid with a declining card: `FAILED`, stock released.
    Decline,
    /// A SKU with no stock: `FAILED` at reservation.
    OutOfStock,
    /// Never verified: `FAILED` once the platform's payment deadline passes.
    Deadline,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Succeed,
        Outcome::Decline,
        Outcome::OutOfStock,
        Outcome::Deadline,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Succeed => "succeed",
            Outcome::Decline => "decline",
            Outcome::OutOfStock => "out-of-stock",
            Outcome::Deadline => "deadline",
        }
    }

    /// The final order status this outcome must end in.
    pub fn expected_status(self) -> &'static str {
        match self {
            Outcome::Succeed => "COMPLETED",
            _ => "FAILED",
        }
    }
}

/// Weights of the outcomes, e.g. `succeed=80,decline=10,out-of-stock=5,deadline=5`.
#[derive(Clone, Debug)]
pub struct Mix(Vec<(Outcome, u32)>);

impl std::str::FromStr for Mix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut weights = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}`: expected name=weight"))?;
            let outcome = Outcome::ALL
                .into_iter()
                .find(|o| o.name() == name.trim())
                .ok_or_else(|| {
                    format!("unknown outcome `{name}` (succeed, decline, out-of-stock, deadline)")
                })?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("`{part}`: weight must be a whole number"))?;
            weights.push((outcome, weight));
        }
        if weights.iter().map(|w| w.1).sum::<u32>() == 0 {
            return Err("the mix needs at least one positive weight".into());
        }
        Ok(Mix(weights))
    }
}

impl Mix {
    /// The outcome of the `i`-th order: deterministic, and spread over the run by a hash, so
    /// that a run of N orders has close to its share of each (within about 2 % of the run
    /// over 10 000 orders), interleaved rather than in blocks.
    pub fn pick(&self, i: u64) -> Outcome {
        let total: u64 = self.0.iter().map(|w| u64::from(w.1)).sum();
        // Spread with a multiplicative hash so outcomes interleave rather than come in blocks.
        let slot = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % total;
        let mut acc = 0;
        for (outcome, weight) in &self.0 {
            acc += u64::from(*weight);
            if slot < acc {
                return *outcome;
            }
        }
        Outcome::Succeed
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_mix_gives_each_outcome_its_share() {
        let mix: Mix = "succeed=70,decline=10,out-of-stock=10,deadline=10"
            .parse()
            .expect("mix");
        let mut counts = BTreeMap::new();
        for i in 0..10_000 {
            *counts.entry(mix.pick(i)).or_insert(0) += 1;
        }
        assert!(
            (6_800..7_200).contains(&counts[&Outcome::Succeed]),
            "{counts:?}"
        );
        for o in [Outcome::Decline, Outcome::OutOfStock, Outcome::Deadline] {
            assert!((800..1_200).contains(&counts[&o]), "{counts:?}");
        }
    }

    #[test]
    fn bad_mixes_are_refused_with_a_reason() {
        assert!("succeed=0".parse::<Mix>().unwrap_err().contains("positive"));
        assert!("win=3"
            .parse::<Mix>()
            .unwrap_err()
            .contains("unknown outcome"));
        assert!("succeed"
            .parse::<Mix>()
            .unwrap_err()
            .contains("name=weight"));
    }
}
