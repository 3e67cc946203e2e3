//! Where a client may call from: the address policy (`strict` networks or `none`), the limits
//! on what an officer may register, the networks a lockdown may block, and the source address
//! of a request behind trusted proxies. Pure: it reads no database and no token (a block it
//! computes is written by the caller, through `store`).

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use super::AuthError;
use crate::store::SourceBlock;

/// Where a client may call from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpPolicy {
    /// Only from these networks (a single address is a /32 or /128).
    Strict(Vec<IpNet>),
    /// From anywhere.
    Any,
}

/// An address or CIDR that does not parse, or a strict policy with none.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpPolicyError {
    /// Not an address or CIDR.
    #[error("{0:?} is not an IP address or CIDR")]
    BadAddress(String),
    /// Strict mode needs at least one.
    #[error("ip_mode strict needs at least one address or CIDR")]
    StrictWithoutAddresses,
    /// Not `strict` or `none`.
    #[error("ip_mode must be strict or none")]
    BadMode,
    /// A strict network so wide it means "anywhere" (e.g. `0.0.0.0/0`).
    #[error(
        "{0} is too wide for ip_mode strict (at most /{STRICT_MIN_PREFIX_V4} for IPv4, /{STRICT_MIN_PREFIX_V6} for IPv6); use ip_mode none to allow any address"
    )]
    TooWide(String),
    /// More networks than a client may list.
    #[error("at most {MAX_CLIENT_NETWORKS} distinct addresses or networks per client")]
    TooMany,
}

/// The widest IPv4 network a strict client may list: anything wider is "anywhere" in practice.
pub const STRICT_MIN_PREFIX_V4: u8 = 8;
/// The widest IPv6 network a strict client may list (a whole ISP allocation).
pub const STRICT_MIN_PREFIX_V6: u8 = 32;
/// How many distinct networks a client may list.
pub const MAX_CLIENT_NETWORKS: usize = 64;

impl IpPolicy {
    /// Builds a policy from a mode and addresses/CIDRs.
    ///
    /// # Errors
    /// [`IpPolicyError`].
    pub fn parse(mode: &str, addresses: &[String]) -> Result<Self, IpPolicyError> {
        let nets = addresses
            .iter()
            .map(|a| parse_net(a).ok_or_else(|| IpPolicyError::BadAddress(a.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        match mode {
            "strict" if nets.is_empty() => Err(IpPolicyError::StrictWithoutAddresses),
            "strict" => Ok(Self::Strict(without_repeats(nets))),
            "none" => Ok(Self::Any),
            _ => Err(IpPolicyError::BadMode),
        }
    }

    /// Checks a policy an officer is registering or changing: no strict network so wide it
    /// means "anywhere", and not too many. (Stored policies are not re-checked: a client
    /// registered before these limits keeps working.)
    ///
    /// # Errors
    /// [`IpPolicyError::TooWide`] or [`IpPolicyError::TooMany`].
    pub fn check_registrable(&self) -> Result<(), IpPolicyError> {
        let Self::Strict(nets) = self else {
            return Ok(());
        };
        if let Some(wide) = nets.iter().find(|n| n.prefix_len() < strict_min_prefix(n)) {
            return Err(IpPolicyError::TooWide(wide.to_string()));
        }
        if nets.len() > MAX_CLIENT_NETWORKS {
            return Err(IpPolicyError::TooMany);
        }
        Ok(())
    }

    /// Whether `ip` may call. IPv4-mapped IPv6 addresses count as their IPv4 address.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match self {
            Self::Any => true,
            Self::Strict(nets) => nets.iter().any(|n| n.contains(&ip)),
        }
    }

    /// `strict` or `none`.
    pub fn mode(&self) -> &'static str {
        match self {
            Self::Strict(_) => "strict",
            Self::Any => "none",
        }
    }

    /// The allowed networks, canonical text (empty for `none`).
    pub fn cidrs(&self) -> Vec<String> {
        match self {
            Self::Strict(nets) => nets.iter().map(ToString::to_string).collect(),
            Self::Any => Vec::new(),
        }
    }
}

/// An address or CIDR as the canonical network it names (host bits cleared, IPv4-mapped IPv6
/// as IPv4).
fn parse_net(text: &str) -> Option<IpNet> {
    IpNet::from_str(text)
        .or_else(|_| IpAddr::from_str(text).map(IpNet::from))
        .ok()
        .map(|n| unmap(n).trunc())
}

fn strict_min_prefix(net: &IpNet) -> u8 {
    match net {
        IpNet::V4(_) => STRICT_MIN_PREFIX_V4,
        IpNet::V6(_) => STRICT_MIN_PREFIX_V6,
    }
}

/// The networks in their first order, without repeats and without any that another one listed
/// already contains (adjacent networks are kept apart: the officer's list stays recognisable).
fn without_repeats(nets: Vec<IpNet>) -> Vec<IpNet> {
    let mut seen = std::collections::HashSet::with_capacity(nets.len());
    let distinct: Vec<IpNet> = nets.into_iter().filter(|n| seen.insert(*n)).collect();
    // The containment pass is quadratic; a list this long is refused for registration anyway.
    if distinct.len() > 4 * MAX_CLIENT_NETWORKS {
        return distinct;
    }
    distinct
        .iter()
        .filter(|net| {
            !distinct
                .iter()
                .any(|other| other != *net && other.contains(*net))
        })
        .copied()
        .collect()
}

/// What a lockdown asks to block.
#[derive(Debug, Clone, Copy)]
pub struct BlockRequest<'a> {
    /// Networks to block, each within one of the client's own; `None`: all of the client's.
    pub cidrs: Option<&'a [String]>,
    /// For how long, in seconds (1 to [`MAX_BLOCK_SECS`]).
    pub secs: u64,
    /// The widest IPv4 network that may be blocked (a prefix length).
    pub min_prefix_v4: u8,
    /// The widest IPv6 network that may be blocked.
    pub min_prefix_v6: u8,
}

/// How long a lockdown blocks addresses unless told otherwise.
pub const DEFAULT_BLOCK_SECS: u64 = 3600;
/// The longest block a lockdown may set (an officer renews it if still needed).
pub const MAX_BLOCK_SECS: u64 = 7 * 86_400;

/// Why a lockdown's block was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The client may call from anywhere: there are no addresses of its own to block.
    #[error("the client has ip_mode none: it has no registered addresses to block")]
    NoRegisteredAddresses,
    /// Not an address or CIDR.
    #[error("{0:?} is not an IP address or CIDR")]
    BadAddress(String),
    /// Outside every network the client registered.
    #[error("{0} is not within the client's registered addresses")]
    NotTheClients(String),
    /// Wider than the configured limit.
    #[error("{net} is wider than the widest network a block may cover (/{limit})")]
    TooWide {
        /// The network.
        net: String,
        /// The configured prefix length.
        limit: u8,
    },
    /// A duration out of range.
    #[error("a block lasts 1 to {MAX_BLOCK_SECS} seconds")]
    BadDuration,
}

/// Which networks a lockdown blocks, and until when: never wider than the client's own
/// registered networks nor than the configured prefixes, and always for a limited time.
///
/// # Errors
/// [`BlockError`] saying what is not allowed.
pub fn block_for(
    policy: &IpPolicy,
    request: BlockRequest<'_>,
    now: i64,
) -> Result<SourceBlock, AuthError> {
    let invalid = AuthError::InvalidBlock;
    if request.secs == 0 || request.secs > MAX_BLOCK_SECS {
        return Err(invalid(BlockError::BadDuration));
    }
    let IpPolicy::Strict(own) = policy else {
        return Err(invalid(BlockError::NoRegisteredAddresses));
    };
    let nets = match request.cidrs {
        None => own.clone(),
        Some(list) => {
            let nets = list
                .iter()
                .map(|a| parse_net(a).ok_or_else(|| invalid(BlockError::BadAddress(a.clone()))))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(foreign) = nets.iter().find(|n| !own.iter().any(|o| o.contains(*n))) {
                return Err(invalid(BlockError::NotTheClients(foreign.to_string())));
            }
            without_repeats(nets)
        }
    };
    for net in &nets {
        let limit = match net {
            IpNet::V4(_) => request.min_prefix_v4,
            IpNet::V6(_) => request.min_prefix_v6,
        };
        if net.prefix_len() < limit {
            return Err(invalid(BlockError::TooWide {
                net: net.to_string(),
                limit,
            }));
        }
    }
    Ok(SourceBlock {
        cidrs: nets.iter().map(ToString::to_string).collect(),
        until: now.saturating_add(i64::try_from(request.secs).unwrap_or(i64::MAX)),
    })
}

/// An IPv4-mapped IPv6 network (`::ffff:a.b.c.d/n`, n ≥ 96) as the IPv4 network it is, since
/// callers' mapped addresses are compared as IPv4 too.
fn unmap(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
        && let Ok(v4net) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4net);
    }
    net
}

/// The source address of a request: the socket peer, or the first address of
/// `X-Forwarded-For` when the peer is a configured trusted proxy.
pub fn source_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    if !trusted.iter().any(|n| n.contains(&peer)) {
        return peer;
    }
    // The right-most address not belonging to a trusted proxy is the client's.
    forwarded_for
        .map(|list| {
            list.split(',')
                .rev()
                .filter_map(|a| IpAddr::from_str(a.trim()).ok())
                .find(|a| !trusted.iter().any(|n| n.contains(a)))
                .unwrap_or(peer)
        })
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn ip_policy_matches_addresses_and_cidrs() {
        let strict =
            IpPolicy::parse("strict", &["127.0.0.1".into(), "10.1.0.0/16".into()]).unwrap();
        assert!(strict.allows("127.0.0.1".parse().unwrap()));
        assert!(!strict.allows("127.0.0.2".parse().unwrap()));
        assert!(strict.allows("10.1.200.3".parse().unwrap()));
        assert!(strict.allows("::ffff:10.1.0.9".parse().unwrap()));
        assert!(!strict.allows("10.2.0.1".parse().unwrap()));
        assert!(
            IpPolicy::parse("none", &[])
                .unwrap()
                .allows("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            IpPolicy::parse("strict", &[]),
            Err(IpPolicyError::StrictWithoutAddresses)
        );
        assert!(IpPolicy::parse("strict", &["300.1.1.1".into()]).is_err());
        assert_eq!(IpPolicy::parse("loose", &[]), Err(IpPolicyError::BadMode));
        // Mapped IPv6 forms are their IPv4 address.
        let mapped = IpPolicy::parse("strict", &["::ffff:127.0.0.1".into()]).unwrap();
        assert!(mapped.allows("127.0.0.1".parse().unwrap()));
        assert_eq!(mapped.cidrs(), vec!["127.0.0.1/32".to_owned()]);
        // Host bits are dropped: 10.1.2.3/16 is 10.1.0.0/16.
        assert_eq!(
            IpPolicy::parse("strict", &["10.1.2.3/16".into()])
                .unwrap()
                .cidrs(),
            vec!["10.1.0.0/16".to_owned()]
        );
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let stranger: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(source_ip(stranger, Some("203.0.113.9"), &trusted), stranger);
        assert_eq!(
            source_ip(proxy, Some("203.0.113.9, 10.0.0.9"), &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(source_ip(proxy, None, &trusted), proxy);
        assert_eq!(source_ip(proxy, Some("garbage"), &trusted), proxy);
    }

    #[test]
    fn strict_networks_are_deduplicated_and_never_mean_anywhere() {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let policy = IpPolicy::parse(
            "strict",
            &strings(&[
                "10.1.2.3",
                "10.1.2.3/32",
                "10.1.0.0/16",
                "10.1.9.9",
                "192.0.2.0/24",
            ]),
        )
        .unwrap();
        assert_eq!(policy.cidrs(), ["10.1.0.0/16", "192.0.2.0/24"]);
        let many = vec!["192.0.2.7".to_owned(); 5000];
        assert_eq!(
            IpPolicy::parse("strict", &many).unwrap().cidrs(),
            ["192.0.2.7/32"]
        );
        for wide in [
            "0.0.0.0/0",
            "::/0",
            "0.0.0.0/7",
            "2001::/31",
            "::ffff:0.0.0.0/96",
        ] {
            let policy = IpPolicy::parse("strict", &strings(&[wide])).unwrap();
            assert!(
                matches!(policy.check_registrable(), Err(IpPolicyError::TooWide(_))),
                "{wide}"
            );
        }
        assert!(IpPolicy::parse("strict", &strings(&["10.0.0.0/8", "2001:db8::/32"])).is_ok());
        let distinct: Vec<String> = (0..65).map(|i| format!("192.0.2.{i}")).collect();
        assert_eq!(
            IpPolicy::parse("strict", &distinct)
                .unwrap()
                .check_registrable(),
            Err(IpPolicyError::TooMany)
        );
        // Mode none ignores addresses as before.
        assert_eq!(
            IpPolicy::parse("none", &strings(&["0.0.0.0/0"])),
            Ok(IpPolicy::Any)
        );
    }

    #[test]
    fn blocks_stay_within_the_clients_networks_and_the_prefix_limits() {
        let own = IpPolicy::parse(
            "strict",
            &[
                "10.16.0.0/12".to_owned(),
                "192.0.2.5".to_owned(),
                "2001:db8::/32".to_owned(),
            ],
        )
        .unwrap();
        fn request(cidrs: Option<&[String]>, secs: u64) -> BlockRequest<'_> {
            BlockRequest {
                cidrs,
                secs,
                min_prefix_v4: 16,
                min_prefix_v6: 48,
            }
        }
        let reason = |r: Result<SourceBlock, AuthError>| match r {
            Err(AuthError::InvalidBlock(e)) => e,
            other => panic!("{other:?}"),
        };
        // All of its own: the /12 and the /32 are wider than allowed for the first.
        assert!(matches!(
            reason(block_for(&own, request(None, 60), 1000)),
            BlockError::TooWide { limit: 16, .. }
        ));
        let list = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let ok = block_for(
            &own,
            request(
                Some(&list(&[
                    "10.17.0.0/16",
                    "192.0.2.5",
                    "192.0.2.5/32",
                    "2001:db8:1::/48",
                ])),
                60,
            ),
            1000,
        )
        .unwrap();
        assert_eq!(
            ok.cidrs,
            ["10.17.0.0/16", "192.0.2.5/32", "2001:db8:1::/48"]
        );
        assert_eq!(ok.until, 1060);
        assert!(matches!(
            reason(block_for(&own, request(Some(&list(&["192.0.2.6"])), 60), 0)),
            BlockError::NotTheClients(_)
        ));
        assert!(matches!(
            reason(block_for(
                &own,
                request(Some(&list(&["2001:db8::/40"])), 60),
                0
            )),
            BlockError::TooWide { limit: 48, .. }
        ));
        assert!(matches!(
            reason(block_for(&own, request(Some(&list(&["x"])), 60), 0)),
            BlockError::BadAddress(_)
        ));
        for secs in [0, MAX_BLOCK_SECS + 1] {
            assert_eq!(
                reason(block_for(
                    &own,
                    request(Some(&list(&["192.0.2.5"])), secs),
                    0
                )),
                BlockError::BadDuration
            );
        }
        assert_eq!(
            reason(block_for(&IpPolicy::Any, request(None, 60), 0)),
            BlockError::NoRegisteredAddresses
        );
    }
}
