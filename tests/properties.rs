//! Property tests: input validation and address classification never panic and agree with themselves.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use postbox::delivery::guard::classify;
use postbox::delivery::Secrets;
use proptest::prelude::*;

proptest! {
    /// An IPv4 address classifies the same in its IPv4-mapped and NAT64 spellings.
    #[test]
    fn embedded_ipv4_classifies_like_ipv4(a: u8, b: u8, c: u8, d: u8) {
        let v4 = Ipv4Addr::new(a, b, c, d);
        let want = classify(IpAddr::V4(v4));
        prop_assert_eq!(classify(IpAddr::V6(v4.to_ipv6_mapped())), want);
        let nat64 = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
        prop_assert_eq!(classify(IpAddr::V6(nat64)), want);
        let six_to_four = Ipv6Addr::new(0x2002, u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]), 0, 0, 0, 0, 1);
        prop_assert_eq!(classify(IpAddr::V6(six_to_four)), want);
    }

    /// Any IPv6 address gets a verdict without panicking.
    #[test]
    fn any_ipv6_classifies(bits: u128) {
        let _ = classify(IpAddr::V6(Ipv6Addr::from(bits)));
    }

    /// Secret parsing never panics and never echoes its input in errors.
    #[test]
    fn secret_parsing_never_echoes(s in "\\PC{0,80}") {
        if let Err(e) = Secrets::parse(&s) {
            let msg = e.to_string();
            for word in s.split_whitespace().filter(|w| w.len() > 8) {
                prop_assert!(!msg.contains(word));
            }
        }
    }

    /// Message JSON: deserialising arbitrary JSON never panics.
    #[test]
    fn message_json_never_panics(s in "\\PC{0,300}") {
        let _ = serde_json::from_str::<postbox::Message>(&s);
    }
}
