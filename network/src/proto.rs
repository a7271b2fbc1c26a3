//! [`Network`] to and from the agent protocol's messages. Decoding checks everything (the
//! guest's reply is untrusted input): sizes bounded by [`crate::MAX_INTERFACES`] and the
//! other limits, names 1-15 bytes, MACs six bytes, addresses and prefixes parsed.

use std::net::IpAddr;

use vmbox_protocol::agent as pb;

use crate::{
    Interface, IpNetwork, Mac, Neighbour, Network, NetworkError, Route, MAX_ADDRESSES, MAX_INTERFACES, MAX_NEIGHBOURS,
    MAX_ROUTES,
};

/// The message of `net`.
pub fn encode(net: &Network) -> pb::Network {
    let mut m = pb::Network::new();
    for i in &net.interfaces {
        let mut p = pb::Interface::new();
        p.name = i.name.clone();
        p.mac = i.mac.0.to_vec();
        p.mtu = i.mtu;
        p.noarp = i.noarp;
        p.addresses = i.addresses.iter().map(|a| a.to_string()).collect();
        m.interfaces.push(p);
    }
    for r in &net.routes {
        let mut p = pb::Route::new();
        p.destination = r.destination.to_string();
        p.gateway = r.gateway.map(|g| g.to_string()).unwrap_or_default();
        p.source = r.source.map(|g| g.to_string()).unwrap_or_default();
        p.device = r.device.clone();
        p.scope = r.scope.into();
        p.onlink = r.onlink;
        p.metric = r.metric;
        m.routes.push(p);
    }
    for n in &net.neighbours {
        let mut p = pb::Neighbour::new();
        p.ip = n.ip.to_string();
        p.mac = n.mac.0.to_vec();
        p.device = n.device.clone();
        m.neighbours.push(p);
    }
    m
}

fn invalid(field: &str, why: impl std::fmt::Display) -> NetworkError {
    NetworkError::Invalid(format!("network.{field}: {why}"))
}

fn name(field: &str, s: &str) -> Result<String, NetworkError> {
    if s.is_empty() || s.len() > 15 || s.contains('/') || s.contains(char::is_whitespace) || s.contains('\0') {
        return Err(invalid(
            field,
            format!("{s:?} is not an interface name (1-15 bytes, no '/' or space)"),
        ));
    }
    Ok(s.to_string())
}

fn mac(field: &str, b: &[u8]) -> Result<Mac, NetworkError> {
    Mac::from_bytes(b).ok_or_else(|| invalid(field, format!("a MAC is 6 bytes, not {}", b.len())))
}

fn ip(field: &str, s: &str) -> Result<Option<IpAddr>, NetworkError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|e| invalid(field, format!("{s:?}: {e}")))
}

fn cidr(field: &str, s: &str) -> Result<IpNetwork, NetworkError> {
    s.parse().map_err(|e| invalid(field, format!("{s:?}: {e}")))
}

fn bounded<T>(field: &str, v: &[T], max: usize) -> Result<(), NetworkError> {
    if v.len() > max {
        return Err(invalid(field, format!("{} entries; at most {max}", v.len())));
    }
    Ok(())
}

/// The [`Network`] of a message, checked; the error names the field.
pub fn decode(m: &pb::Network) -> Result<Network, NetworkError> {
    bounded("interfaces", &m.interfaces, MAX_INTERFACES)?;
    bounded("routes", &m.routes, MAX_ROUTES)?;
    bounded("neighbours", &m.neighbours, MAX_NEIGHBOURS)?;
    let mut net = Network::default();
    for (n, p) in m.interfaces.iter().enumerate() {
        let f = |s: &str| format!("interfaces[{n}].{s}");
        bounded(&f("addresses"), &p.addresses, MAX_ADDRESSES)?;
        net.interfaces.push(Interface {
            name: name(&f("name"), &p.name)?,
            mac: mac(&f("mac"), &p.mac)?,
            mtu: p.mtu,
            noarp: p.noarp,
            addresses: p
                .addresses
                .iter()
                .map(|a| cidr(&f("addresses"), a))
                .collect::<Result<_, _>>()?,
        });
    }
    for (n, p) in m.routes.iter().enumerate() {
        let f = |s: &str| format!("routes[{n}].{s}");
        net.routes.push(Route {
            destination: cidr(&f("destination"), &p.destination)?,
            gateway: ip(&f("gateway"), &p.gateway)?,
            source: ip(&f("source"), &p.source)?,
            device: name(&f("device"), &p.device)?,
            scope: u8::try_from(p.scope).map_err(|_| invalid(&f("scope"), format!("{} > 255", p.scope)))?,
            onlink: p.onlink,
            metric: p.metric,
        });
    }
    for (n, p) in m.neighbours.iter().enumerate() {
        let f = |s: &str| format!("neighbours[{n}].{s}");
        net.neighbours.push(Neighbour {
            ip: ip(&f("ip"), &p.ip)?.ok_or_else(|| invalid(&f("ip"), "empty"))?,
            mac: mac(&f("mac"), &p.mac)?,
            device: name(&f("device"), &p.device)?,
        });
    }
    net.normalize();
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Network {
        let mut n = Network {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: Mac([2, 0, 0, 0, 0, 1]),
                mtu: 1400,
                noarp: false,
                addresses: vec!["10.0.0.2/24".parse().unwrap(), "fd00::2/64".parse().unwrap()],
            }],
            routes: vec![Route {
                destination: "0.0.0.0/0".parse().unwrap(),
                gateway: Some("10.0.0.1".parse().unwrap()),
                source: None,
                device: "eth0".into(),
                scope: 0,
                onlink: false,
                metric: 0,
            }],
            neighbours: vec![Neighbour {
                ip: "10.0.0.9".parse().unwrap(),
                mac: Mac([2, 0, 0, 0, 0, 9]),
                device: "eth0".into(),
            }],
        };
        n.normalize();
        n
    }

    #[test]
    fn a_network_survives_the_wire() {
        assert_eq!(decode(&encode(&sample())).unwrap(), sample());
    }

    #[test]
    fn bad_fields_are_named() {
        let mut m = encode(&sample());
        m.interfaces[0].mac = vec![1, 2, 3];
        assert!(decode(&m).unwrap_err().to_string().contains("interfaces[0].mac"));
        let mut m = encode(&sample());
        m.routes[0].gateway = "10.0.0.x".into();
        assert!(decode(&m).unwrap_err().to_string().contains("routes[0].gateway"));
        let mut m = encode(&sample());
        m.interfaces[0].name = "../etc".into();
        assert!(decode(&m).unwrap_err().to_string().contains("interfaces[0].name"));
        let mut m = encode(&sample());
        m.routes = vec![m.routes[0].clone(); MAX_ROUTES + 1];
        assert!(decode(&m).unwrap_err().to_string().contains("network.routes"));
    }
}
