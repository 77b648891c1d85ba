//! Which OpenAI operation an incoming request is, from its method and path.

use crate::errors::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Operation {
    /// The operation's path below `/openai/deployments/{deployment}/`.
    pub fn azure_path(self) -> &'static str {
        match self {
            Operation::ChatCompletions => "chat/completions",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
        }
    }
}

struct Route {
    path: &'static str,
    method: &'static str,
    operation: Operation,
}

const ROUTES: &[Route] = &[
    Route {
        path: "/v1/chat/completions",
        method: "POST",
        operation: Operation::ChatCompletions,
    },
    Route {
        path: "/v1/completions",
        method: "POST",
        operation: Operation::Completions,
    },
    Route {
        path: "/v1/embeddings",
        method: "POST",
        operation: Operation::Embeddings,
    },
];

/// Classifies a request; unknown paths get 404 and known paths with another
/// method get 405. The query string plays no part (and is not forwarded).
pub fn classify(method: &[u8], path_and_query: &[u8]) -> Result<Operation, ApiError> {
    let path = path_and_query
        .split(|&b| b == b'?')
        .next()
        .unwrap_or(path_and_query);
    let route = ROUTES
        .iter()
        .find(|route| route.path.as_bytes() == path)
        .ok_or_else(|| ApiError::unknown_url(method, path))?;
    if route.method.as_bytes() != method {
        return Err(ApiError::method_not_allowed(
            method,
            route.path,
            route.method,
        ));
    }
    Ok(route.operation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_operations() {
        assert_eq!(
            classify(b"POST", b"/v1/chat/completions"),
            Ok(Operation::ChatCompletions)
        );
        assert_eq!(
            classify(b"POST", b"/v1/completions"),
            Ok(Operation::Completions)
        );
        assert_eq!(
            classify(b"POST", b"/v1/embeddings"),
            Ok(Operation::Embeddings)
        );
    }

    #[test]
    fn query_is_ignored() {
        assert_eq!(
            classify(b"POST", b"/v1/chat/completions?api-version=1&x=y"),
            Ok(Operation::ChatCompletions)
        );
    }

    #[test]
    fn azure_paths() {
        assert_eq!(Operation::ChatCompletions.azure_path(), "chat/completions");
        assert_eq!(Operation::Completions.azure_path(), "completions");
        assert_eq!(Operation::Embeddings.azure_path(), "embeddings");
    }

    #[test]
    fn unknown_paths_are_404() {
        for path in [
            &b"/v1/chat/completions/"[..],
            b"/v1/chat",
            b"/chat/completions",
            b"/v1/CHAT/completions",
            b"/v1/chat%2Fcompletions",
            b"/",
            b"",
            b"/v1/\xff",
        ] {
            let error = classify(b"POST", path).unwrap_err();
            assert_eq!(error.status, 404, "{path:?}");
            assert_eq!(error.code, "unknown_url");
        }
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        let error = classify(b"GET", b"/v1/chat/completions").unwrap_err();
        assert_eq!(error.status, 405);
        assert_eq!(error.headers, vec![("allow", "POST".to_string())]);
        assert_eq!(
            error.message,
            "Method GET is not allowed on /v1/chat/completions; use POST."
        );
        assert_eq!(
            classify(b"post", b"/v1/embeddings").unwrap_err().status,
            405
        );
    }
}
