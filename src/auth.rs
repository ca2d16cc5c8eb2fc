//! Bearer tokens and their scopes (SPEC sections 6 and 12): the legacy
//! `server.auth_token(_file)` may do everything; each `[[server.tokens]]`
//! entry only its scopes. Without any token configured the API is open.
//! `GET /metrics` needs a token only when some named token has the
//! `metrics` scope (Prometheus scrapes without one by default).

use crate::config::{Config, Scope};

/// One token, read from its file.
struct Token {
    name: String,
    secret: String,
    /// `None`: every scope.
    scopes: Option<Vec<Scope>>,
}

/// The tokens of one configuration (reloaded with it).
#[derive(Default)]
pub struct Tokens {
    tokens: Vec<Token>,
    metrics_protected: bool,
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No token is configured (or none is needed for this scope).
    Anyone,
    /// The token of this name.
    Named(String),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Anyone => f.write_str("(no token)"),
            Caller::Named(n) => f.write_str(n),
        }
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// 401: no token, or not a known one.
    Unauthenticated,
    /// 403: a known token without the scope.
    Scope {
        /// The token's name.
        name: String,
        /// The scope it lacks.
        scope: Scope,
    },
}

impl Tokens {
    /// Reads every token file of `config`.
    pub fn load(config: &Config) -> Result<Self, String> {
        let server = &config.server;
        let mut tokens = Vec::new();
        let legacy = match (&server.auth_token_file, &server.auth_token) {
            (Some(path), _) => Some(std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "server.auth_token_file: cannot read {}: {e}",
                    path.display()
                )
            })?),
            (None, Some(t)) => Some(t.clone()),
            (None, None) => None,
        };
        if let Some(secret) = legacy {
            tokens.push(Token {
                name: "auth_token".into(),
                secret: secret.trim().to_string(),
                scopes: None,
            });
        }
        for (i, t) in server.tokens.iter().enumerate() {
            let secret = std::fs::read_to_string(&t.file).map_err(|e| {
                format!(
                    "server.tokens[{i}].file: cannot read {}: {e}",
                    t.file.display()
                )
            })?;
            tokens.push(Token {
                name: t.name.clone(),
                secret: secret.trim().to_string(),
                scopes: Some(t.scopes.clone()),
            });
        }
        let metrics_protected = server
            .tokens
            .iter()
            .any(|t| t.scopes.contains(&Scope::Metrics));
        Ok(Self {
            tokens,
            metrics_protected,
        })
    }

    /// A single all-scopes token (tests and embedders).
    pub fn single(secret: Option<String>) -> Self {
        Self {
            tokens: secret
                .map(|secret| Token {
                    name: "auth_token".into(),
                    secret,
                    scopes: None,
                })
                .into_iter()
                .collect(),
            metrics_protected: false,
        }
    }

    /// Whether `given` (the bearer token, if any) may act in `scope`. Every
    /// configured token is compared, each in constant time.
    pub fn check(&self, given: Option<&str>, scope: Scope) -> Result<Caller, Denied> {
        if self.tokens.is_empty() || (scope == Scope::Metrics && !self.metrics_protected) {
            return Ok(Caller::Anyone);
        }
        let given = given.unwrap_or("");
        let mut found: Option<&Token> = None;
        for token in &self.tokens {
            let same = aws_lc_rs::constant_time::verify_slices_are_equal(
                given.as_bytes(),
                token.secret.as_bytes(),
            )
            .is_ok();
            if same && found.is_none() {
                found = Some(token);
            }
        }
        let token = found.ok_or(Denied::Unauthenticated)?;
        match &token.scopes {
            Some(scopes) if !scopes.contains(&scope) => Err(Denied::Scope {
                name: token.name.clone(),
                scope,
            }),
            _ => Ok(Caller::Named(token.name.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens {
            tokens: vec![
                Token {
                    name: "all".into(),
                    secret: "s-all".into(),
                    scopes: None,
                },
                Token {
                    name: "runtime".into(),
                    secret: "s-run".into(),
                    scopes: Some(vec![Scope::Ingest]),
                },
            ],
            metrics_protected: false,
        }
    }

    #[test]
    fn scopes_are_enforced_by_name() {
        let t = tokens();
        assert_eq!(
            t.check(Some("s-run"), Scope::Ingest),
            Ok(Caller::Named("runtime".into()))
        );
        assert_eq!(
            t.check(Some("s-run"), Scope::Admin),
            Err(Denied::Scope {
                name: "runtime".into(),
                scope: Scope::Admin
            })
        );
        assert_eq!(
            t.check(Some("s-all"), Scope::Destinations),
            Ok(Caller::Named("all".into()))
        );
        assert_eq!(t.check(None, Scope::Ingest), Err(Denied::Unauthenticated));
        assert_eq!(
            t.check(Some("nope"), Scope::Ingest),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(t.check(None, Scope::Metrics), Ok(Caller::Anyone));
        assert_eq!(
            Tokens::default().check(None, Scope::Admin),
            Ok(Caller::Anyone)
        );
    }
}
