//! Choosing a free subnet, shared by every store that allocates (etcd).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use flannel_types::{NetworkConfig, SubnetKey};
use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;

use super::StoreError;

/// At most this many free candidates are collected before one is picked at random.
pub const MAX_CANDIDATES: usize = 100;

fn overlaps_v4(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn overlaps_v6(a: &Ipv6Net, b: &Ipv6Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Picks a random free subnet among the first [`MAX_CANDIDATES`] free ones of the configured
/// range, skipping subnets that overlap `taken` (and, for IPv6, their v6 parts).
pub fn pick_free_subnet(
    config: &NetworkConfig,
    taken: &BTreeSet<SubnetKey>,
    rng: &mut impl Rng,
) -> Result<SubnetKey, StoreError> {
    let (Some(min), Some(max)) = (config.subnet_min, config.subnet_max) else {
        return Err(StoreError::OutOfSubnets);
    };
    let len = config.subnet_len as u8;
    let step = 1u64 << (32 - config.subnet_len);
    let mut free_v4 = vec![];
    let mut ip = u32::from(min) as u64;
    while ip <= u32::from(max) as u64 && free_v4.len() < MAX_CANDIDATES {
        let Ok(sn) = Ipv4Net::new(Ipv4Addr::from(ip as u32), len) else {
            break;
        };
        if !taken.iter().any(|k| overlaps_v4(&sn, &k.ipv4)) {
            free_v4.push(sn);
        }
        ip += step;
    }
    let mut free_v6 = vec![];
    if config.enable_ipv6 {
        let (Some(min6), Some(max6)) = (config.ipv6_subnet_min, config.ipv6_subnet_max) else {
            return Err(StoreError::OutOfSubnets);
        };
        let len6 = config.ipv6_subnet_len as u8;
        let step6 = 1u128 << (128 - config.ipv6_subnet_len);
        let mut ip6 = u128::from(min6);
        while ip6 <= u128::from(max6) && free_v6.len() < MAX_CANDIDATES {
            let Ok(sn) = Ipv6Net::new(Ipv6Addr::from(ip6), len6) else {
                break;
            };
            if !taken
                .iter()
                .any(|k| k.ipv6.is_some_and(|t| overlaps_v6(&sn, &t)))
            {
                free_v6.push(sn);
            }
            match ip6.checked_add(step6) {
                Some(n) => ip6 = n,
                None => break,
            }
        }
        if free_v6.is_empty() {
            return Err(StoreError::OutOfSubnets);
        }
    }
    if free_v4.is_empty() {
        return Err(StoreError::OutOfSubnets);
    }
    let v4 = free_v4[rng.random_range(0..free_v4.len())];
    let v6 = (!free_v6.is_empty()).then(|| free_v6[rng.random_range(0..free_v6.len())]);
    Ok(SubnetKey::new(v4, v6))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> NetworkConfig {
        NetworkConfig::parse_and_check(text).unwrap()
    }

    #[test]
    fn picks_in_range_and_skips_taken() {
        let c = cfg(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.1.0","SubnetMax":"10.3.3.0"}"#);
        let taken: BTreeSet<SubnetKey> = ["10.3.1.0-24", "10.3.3.0-24"]
            .iter()
            .map(|k| k.parse().unwrap())
            .collect();
        let mut rng = rand::rng();
        for _ in 0..20 {
            let k = pick_free_subnet(&c, &taken, &mut rng).unwrap();
            assert_eq!(k.to_string(), "10.3.2.0-24");
        }
    }

    #[test]
    fn out_of_subnets() {
        let c = cfg(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.1.0","SubnetMax":"10.3.1.0"}"#);
        let taken: BTreeSet<SubnetKey> =
            ["10.3.1.0-24"].iter().map(|k| k.parse().unwrap()).collect();
        assert!(matches!(
            pick_free_subnet(&c, &taken, &mut rand::rng()),
            Err(StoreError::OutOfSubnets)
        ));
    }

    #[test]
    fn dual_stack_picks_both() {
        let c = cfg(r#"{"Network":"10.3.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}"#);
        let k = pick_free_subnet(&c, &BTreeSet::new(), &mut rand::rng()).unwrap();
        assert_eq!(k.ipv4.prefix_len(), 24);
        assert_eq!(k.ipv6.unwrap().prefix_len(), 64);
    }
}
