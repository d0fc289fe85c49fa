// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Pre-shared-token authentication of a migration peer, for links that anyone on the network
//! can reach (TCP).
//!
//! The destination speaks first: it sends a fresh random [`Message::Challenge`]; the source
//! answers with [`Message::Proof`], an HMAC-SHA256 of the challenge under the token. The
//! token itself never crosses the link, so a peer that overheard one migration cannot replay
//! it for the next. The destination reads the proof with a frame limit of
//! [`AUTH_FRAME_LIMIT`] bytes, so an unauthenticated peer cannot make it allocate anything
//! worth mentioning, and checks it in constant time.
//!
//! ```
//! use vm_live_migration::auth::{self, Token};
//! let token = Token::new(b"a shared secret of 16+ bytes".to_vec()).unwrap();
//! let challenge = auth::challenge().unwrap();
//! let proof = auth::prove(&token, &challenge);
//! assert!(auth::verify(&token, &challenge, &proof));
//! assert!(!auth::verify(&Token::new(vec![b'x'; 16]).unwrap(), &challenge, &proof));
//! ```

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::protocol::{recv, send, FrameLimits, Message, ProtocolError, Violation};

/// Length of a challenge and of a proof.
pub const AUTH_LEN: usize = 32;
/// Largest frame read from a peer that has not proved itself yet.
pub const AUTH_FRAME_LIMIT: u64 = 64;
/// Shortest token accepted (bytes).
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted (bytes).
pub const MAX_TOKEN_LEN: usize = 4096;
/// Binds a proof to this protocol, so it means nothing to any other use of the same token.
// The crate's old name: these bytes are part of every proof on the wire, so they stay as
// they were when peers of the first release computed them (the rename must not break
// migration between old and new builds).
const CONTEXT: &[u8] = b"vm-migration auth v1";

/// A pre-shared token. Its bytes are never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({} bytes)", self.0.len())
    }
}

/// Errors of [`Token::new`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Fewer than [`MIN_TOKEN_LEN`] or more than [`MAX_TOKEN_LEN`] bytes.
    #[error("a migration token has {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} bytes, this one {0}")]
    Length(usize),
}

impl Token {
    /// A token of [`MIN_TOKEN_LEN`]..=[`MAX_TOKEN_LEN`] bytes.
    pub fn new(bytes: Vec<u8>) -> Result<Token, TokenError> {
        if (MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&bytes.len()) {
            Ok(Token(bytes))
        } else {
            Err(TokenError::Length(bytes.len()))
        }
    }
}

fn mac(token: &Token) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&token.0)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    m.update(CONTEXT);
    m
}

/// A fresh random challenge (from the kernel's CSPRNG).
pub fn challenge() -> std::io::Result<[u8; AUTH_LEN]> {
    let mut c = [0u8; AUTH_LEN];
    let mut got = 0;
    while got < c.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `c`.
        let n = unsafe { libc::getrandom(c[got..].as_mut_ptr().cast(), c.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        got += n as usize;
    }
    Ok(c)
}

/// The source's answer to `challenge`.
pub fn prove(token: &Token, challenge: &[u8]) -> [u8; AUTH_LEN] {
    let mut m = mac(token);
    m.update(challenge);
    m.finalize().into_bytes().into()
}

/// Whether `proof` answers `challenge` under `token` (constant time).
pub fn verify(token: &Token, challenge: &[u8], proof: &[u8]) -> bool {
    let mut m = mac(token);
    m.update(challenge);
    m.verify_slice(proof).is_ok()
}

/// Destination: challenge the peer and check its proof. A wrong proof gets a `Refuse`.
pub fn demand<S: Read + Write>(stream: &mut S, token: &Token) -> Result<(), ProtocolError> {
    let c = challenge()?;
    send(stream, &Message::Challenge(c.to_vec()))?;
    let limits = FrameLimits {
        max_frame: AUTH_FRAME_LIMIT,
    };
    match recv(stream, &limits)? {
        Message::Proof(p) if verify(token, &c, &p) => Ok(()),
        Message::Proof(_) => {
            let _ = send(stream, &Message::Refuse("wrong migration token".into()));
            Err(ProtocolError::Invalid(Violation::WrongToken))
        }
        m => Err(ProtocolError::Invalid(Violation::Unexpected {
            expected: "the answer to the token challenge",
            got: m.name(),
        })),
    }
}

/// Source: answer the destination's challenge.
pub fn answer<S: Read + Write>(stream: &mut S, token: &Token) -> Result<(), ProtocolError> {
    let limits = FrameLimits {
        max_frame: AUTH_FRAME_LIMIT,
    };
    match recv(stream, &limits)? {
        Message::Challenge(c) if c.len() == AUTH_LEN => {
            send(stream, &Message::Proof(prove(token, &c).to_vec()))
        }
        Message::Refuse(why) => Err(ProtocolError::Peer(why)),
        m => Err(ProtocolError::Invalid(Violation::Unexpected {
            expected: "a token challenge",
            got: m.name(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn token(s: &str) -> Token {
        Token::new(s.as_bytes().to_vec()).unwrap()
    }

    /// The proof is part of the wire protocol: a build that computed it differently (the
    /// crate's rename once changed the context bytes) could not migrate to or from another.
    /// The value is HMAC-SHA256(token, "vm-migration auth v1" || challenge), from Python's hmac.
    #[test]
    fn the_proof_is_what_every_build_computes() {
        let p = prove(&token("0123456789abcdef"), &[0u8; AUTH_LEN]);
        let hex: String = p.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "144884afab40879a226c6a3e9de56c61a658bb448592ecd65d7501a926199a21"
        );
    }

    #[test]
    fn tokens_are_bounded_and_never_printed() {
        assert_eq!(Token::new(vec![1; 15]), Err(TokenError::Length(15)));
        assert!(Token::new(vec![1; MAX_TOKEN_LEN + 1]).is_err());
        assert_eq!(format!("{:?}", token("0123456789abcdef")), "Token(16 bytes)");
    }

    #[test]
    fn challenges_differ() {
        assert_ne!(challenge().unwrap(), challenge().unwrap());
    }

    fn run(dest: Token, src: Token) -> (Result<(), ProtocolError>, Result<(), ProtocolError>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || demand(&mut a, &dest));
        let s = answer(&mut b, &src).and_then(|()| {
            // A refusal (wrong token) follows the proof; after a pass the destination's end
            // closes when its thread returns, so EOF ends the read (the timeout only guards a hang).
            b.set_read_timeout(Some(std::time::Duration::from_secs(60)))
                .unwrap();
            match recv(&mut b, &FrameLimits::default()) {
                Ok(Message::Refuse(why)) => Err(ProtocolError::Peer(why)),
                _ => Ok(()),
            }
        });
        (t.join().unwrap(), s)
    }

    #[test]
    fn the_right_token_passes_and_a_wrong_one_is_refused() {
        let (d, s) = run(token("the right token!"), token("the right token!"));
        assert!(d.is_ok() && s.is_ok(), "{d:?} {s:?}");
        let (d, s) = run(token("the right token!"), token("the wrong token!"));
        assert!(matches!(d, Err(ProtocolError::Invalid(_))), "{d:?}");
        assert!(
            matches!(s, Err(ProtocolError::Peer(ref w)) if w.contains("wrong")),
            "{s:?}"
        );
    }

    #[test]
    fn an_unauthenticated_peer_cannot_send_a_large_frame() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || demand(&mut a, &token("the right token!")));
        let _ = recv(&mut b, &FrameLimits::default()).unwrap();
        // A Hello of 1 MiB where the proof belongs: refused on its header.
        let hello = Message::Hello {
            version: 1,
            compat: vec![0; 1 << 20],
        };
        let _ = b.write_all(&hello.encode()[..9]);
        let e = t.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("exceeds the limit"), "{e}");
    }
}
