//! Upstream endpoints: an origin (`https://host[:port]`) or a bare Azure
//! resource name. Anything else (a path, a query, user info, another scheme)
//! is refused, because the filter builds the path itself.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: Scheme,
    /// Lower-cased host name, IPv4 address or bracketed IPv6 address.
    pub host: String,
    pub port: Option<u16>,
}

impl Endpoint {
    /// What goes into `:authority`: the host, plus the port when it is not
    /// the scheme's default.
    pub fn authority(&self) -> String {
        let default_port = match self.scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        };
        match self.port {
            Some(port) if port != default_port => format!("{}:{}", self.host, port),
            _ => self.host.clone(),
        }
    }
}

/// Parses `https://host[:port]`, `http://host[:port]` (a trailing `/` is
/// allowed) or a bare resource name (`acme-west` meaning
/// `https://acme-west.openai.azure.com`).
pub fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    let Some((scheme, rest)) = text.split_once("://") else {
        return parse_resource_name(text);
    };
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "https" => Scheme::Https,
        "http" => Scheme::Http,
        _ => {
            return Err(format!(
                "scheme `{scheme}` is not supported; use https:// (or http:// for a local stand-in)"
            ))
        }
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if let Some(at) = authority.find(['/', '?', '#', '@']) {
        let what = match authority.get(at..at + 1) {
            Some("/") => "a path",
            Some("?") => "a query",
            Some("#") => "a fragment",
            _ => "user info",
        };
        return Err(format!(
            "must be an origin like https://host[:port] without {what}; the filter builds the path"
        ));
    }
    let (host, port) = split_host_port(authority)?;
    Ok(Endpoint { scheme, host, port })
}

/// An origin with an optional base path (`http://vllm:8000/v1`), for
/// OpenAI-compatible servers. The path comes back without a trailing `/`.
pub fn parse_base_url(text: &str) -> Result<(Endpoint, String), String> {
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err(format!(
            "`{text}` is not a URL like https://host[:port][/base/path]"
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    let path = path.trim_end_matches('/');
    let path_ok = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~/".contains(&b))
        && !path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
        && !path.contains("//");
    if !path_ok {
        return Err(format!(
            "the base path `{path}` may hold only letters, digits, `-`, `.`, `_`, `~` and single `/`"
        ));
    }
    let endpoint = parse_endpoint(&format!("{scheme}://{authority}"))?;
    Ok((endpoint, path.to_string()))
}

fn parse_resource_name(name: &str) -> Result<Endpoint, String> {
    let valid = (2..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !valid {
        return Err(format!(
            "`{name}` is neither an origin (https://host[:port]) nor an Azure resource name \
             (2-64 letters, digits and hyphens)"
        ));
    }
    Ok(Endpoint {
        scheme: Scheme::Https,
        host: format!("{}.openai.azure.com", name.to_ascii_lowercase()),
        port: None,
    })
}

fn split_host_port(authority: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if authority.starts_with('[') {
        // [IPv6]:port
        let close = authority
            .find(']')
            .ok_or_else(|| "unclosed `[` in IPv6 host".to_string())?;
        let host = authority.get(..=close).unwrap_or_default();
        let rest = authority.get(close + 1..).unwrap_or_default();
        let port = match rest.strip_prefix(':') {
            Some(port) => Some(port),
            None if rest.is_empty() => None,
            None => return Err(format!("unexpected `{rest}` after the IPv6 host")),
        };
        let inner = host.get(1..host.len() - 1).unwrap_or_default();
        if inner.is_empty()
            || !inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(format!("`{host}` is not an IPv6 address"));
        }
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if !host.starts_with('[') {
        let valid = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !host.starts_with(['.', '-'])
            && !host.ends_with(['.', '-'])
            && !host.contains("..");
        if !valid {
            return Err(format!("`{host}` is not a valid host name"));
        }
    }
    let port = match port {
        None => None,
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port > 0 && text.bytes().all(|b| b.is_ascii_digit()) => Some(port),
            _ => return Err(format!("`{text}` is not a valid port")),
        },
    };
    Ok((host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Endpoint {
        parse_endpoint(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn err(text: &str) -> String {
        parse_endpoint(text).expect_err(text)
    }

    #[test]
    fn https_origin() {
        let e = ok("https://acme-west.openai.azure.com");
        assert_eq!(e.scheme, Scheme::Https);
        assert_eq!(e.host, "acme-west.openai.azure.com");
        assert_eq!(e.port, None);
        assert_eq!(e.authority(), "acme-west.openai.azure.com");
    }

    #[test]
    fn trailing_slash_and_case_are_tolerated() {
        let e = ok("HTTPS://Acme-West.OpenAI.Azure.com/");
        assert_eq!(e.authority(), "acme-west.openai.azure.com");
    }

    #[test]
    fn default_port_is_left_out_of_authority() {
        assert_eq!(ok("https://a.example:443").authority(), "a.example");
        assert_eq!(ok("http://a.example:80").authority(), "a.example");
        assert_eq!(ok("https://a.example:8443").authority(), "a.example:8443");
    }

    #[test]
    fn plain_http_for_local_stand_ins() {
        let e = ok("http://127.0.0.1:18081");
        assert_eq!(e.scheme, Scheme::Http);
        assert_eq!(e.authority(), "127.0.0.1:18081");
    }

    #[test]
    fn ipv6_host() {
        let e = ok("http://[::1]:8080");
        assert_eq!(e.authority(), "[::1]:8080");
        let e = ok("https://[2001:db8::1]");
        assert_eq!((e.authority().as_str(), e.port), ("[2001:db8::1]", None));
        assert!(err("http://[::1]x").contains("after the IPv6 host"));
        assert!(err("http://[::1").contains("unclosed"));
        assert!(err("http://[zz]:1").contains("IPv6"));
    }

    #[test]
    fn bare_resource_name() {
        let e = ok("acme-west");
        assert_eq!(e.scheme, Scheme::Https);
        assert_eq!(e.authority(), "acme-west.openai.azure.com");
    }

    #[test]
    fn base_urls_for_openai_compatible_servers() {
        let (e, path) = parse_base_url("http://vllm.internal:8000/v1/").unwrap();
        assert_eq!(
            (e.authority().as_str(), path.as_str()),
            ("vllm.internal:8000", "/v1")
        );
        let (e, path) = parse_base_url("https://api.example.com").unwrap();
        assert_eq!(
            (e.authority().as_str(), path.as_str()),
            ("api.example.com", "")
        );
        assert_eq!(parse_base_url("https://h/a/b").unwrap().1, "/a/b");
        for bad in [
            "vllm:8000",
            "https://h/a?b",
            "https://h/../x",
            "https://h/a//b",
            "ftp://h/v1",
            "https://u@h/v1",
        ] {
            assert!(parse_base_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refusals_name_the_reason() {
        assert!(err("https://a.example/openai").contains("a path"));
        assert!(err("https://a.example?x=1").contains("a query"));
        assert!(err("https://a.example#frag").contains("a fragment"));
        assert!(err("https://user:pw@a.example").contains("user info"));
        assert!(err("ftp://a.example").contains("scheme `ftp`"));
        assert!(err("https://a.example:0").contains("port"));
        assert!(err("https://a.example:99999").contains("port"));
        assert!(err("https://a.example:+1").contains("port"));
        assert!(err("https://").contains("host"));
        assert!(err("https://a..example").contains("host"));
        assert!(err("https://-a.example").contains("host"));
        assert!(err("acme west").contains("resource name"));
        assert!(err("-acme").contains("resource name"));
        assert!(err("a").contains("resource name"));
        assert!(err("acme.openai.azure.com").contains("resource name"));
    }
}
