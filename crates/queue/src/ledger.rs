//! The life of one queued request, as a pure state machine: what a delivery's outcome means for it, and when it is
//! tried next. Times are milliseconds since the Unix epoch, passed in.

/// Where a queued request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for (another) delivery, at `next_at_ms`.
    Queued,
    /// Delivered: the service answered 2xx.
    Done,
    /// The service refused it for good (a 4xx other than 408 and 429); its answer is kept.
    Failed,
    /// Every attempt failed: a dead letter, until replayed or purged.
    Dead,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Done => "done",
            State::Failed => "failed",
            State::Dead => "dead",
        }
    }

    fn code(self) -> u8 {
        match self {
            State::Queued => 0,
            State::Done => 1,
            State::Failed => 2,
            State::Dead => 3,
        }
    }

    fn from_code(c: u8) -> Option<State> {
        Some(match c {
            0 => State::Queued,
            1 => State::Done,
            2 => State::Failed,
            3 => State::Dead,
            _ => return None,
        })
    }
}

/// The status of one queued request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    pub attempts: u32,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// When a queued request is due.
    pub next_at_ms: u64,
    /// The service's last status, if it answered.
    pub last_status: Option<u16>,
    /// The last delivery error, if it did not.
    pub last_error: Option<String>,
    /// The service's answer body (kept for done and failed requests, bounded).
    pub body: Vec<u8>,
}

/// Delivery settings of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub attempts_max: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The service answered.
    Answered { status: u16, body: Vec<u8> },
    /// No answer: connect error, timeout, reset, or the proxy could not find a server.
    Error(String),
}

/// Largest answer body kept in a request's status.
pub const KEPT_BODY_BYTES_MAX: usize = 16 * 1024;

impl Status {
    pub fn new(now_ms: u64) -> Status {
        Status {
            state: State::Queued,
            attempts: 0,
            created_ms: now_ms,
            updated_ms: now_ms,
            next_at_ms: now_ms,
            last_status: None,
            last_error: None,
            body: Vec::new(),
        }
    }

    /// Applies one delivery's outcome. `jitter` in 0..1 spreads retries (half the back-off is random).
    pub fn after_delivery(&mut self, outcome: Outcome, now_ms: u64, p: &Policy, jitter: f64) {
        self.attempts += 1;
        self.updated_ms = now_ms;
        let retry = match outcome {
            Outcome::Answered { status, mut body } => {
                body.truncate(KEPT_BODY_BYTES_MAX);
                self.last_status = Some(status);
                self.last_error = None;
                match status {
                    200..=299 => {
                        self.state = State::Done;
                        self.body = body;
                        return;
                    }
                    408 | 429 => true,
                    400..=499 => {
                        self.state = State::Failed;
                        self.body = body;
                        return;
                    }
                    _ => {
                        self.body = body;
                        true
                    }
                }
            }
            Outcome::Error(e) => {
                self.last_status = None;
                self.last_error = Some(e);
                true
            }
        };
        debug_assert!(retry);
        if self.attempts >= p.attempts_max {
            self.state = State::Dead;
            return;
        }
        self.state = State::Queued;
        self.next_at_ms = now_ms + backoff_ms(self.attempts, p, jitter);
    }

    /// A dead letter sent again: queued now, with a fresh count of attempts.
    pub fn replay(&mut self, now_ms: u64) {
        self.state = State::Queued;
        self.attempts = 0;
        self.next_at_ms = now_ms;
        self.updated_ms = now_ms;
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + self.body.len());
        out.push(self.state.code());
        out.extend_from_slice(&self.attempts.to_le_bytes());
        for v in [self.created_ms, self.updated_ms, self.next_at_ms] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.last_status.unwrap_or(0).to_le_bytes());
        let err = self.last_error.as_deref().unwrap_or("").as_bytes();
        out.extend_from_slice(&(err.len() as u32).to_le_bytes());
        out.extend_from_slice(err);
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    pub fn decode(b: &[u8]) -> Option<Status> {
        let mut r = crate::record::Reader::new(b);
        let state = State::from_code(r.u8()?)?;
        let attempts = r.u32()?;
        let (created_ms, updated_ms, next_at_ms) = (r.u64()?, r.u64()?, r.u64()?);
        let last_status = Some(r.u16()?).filter(|&s| s != 0);
        let err = r.bytes()?;
        let last_error = (!err.is_empty()).then(|| String::from_utf8_lossy(err).into_owned());
        let body = r.bytes()?.to_vec();
        Some(Status { state, attempts, created_ms, updated_ms, next_at_ms, last_status, last_error, body })
    }
}

/// Exponential back-off after `attempts` failures, capped, with half of it random (`jitter` in 0..1).
pub fn backoff_ms(attempts: u32, p: &Policy, jitter: f64) -> u64 {
    let exp = p.backoff_base_ms.saturating_mul(1u64 << attempts.saturating_sub(1).min(30));
    let capped = exp.min(p.backoff_max_ms);
    capped / 2 + ((capped / 2) as f64 * jitter.clamp(0.0, 1.0)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy { attempts_max: 3, backoff_base_ms: 100, backoff_max_ms: 1000 };

    fn answered(status: u16) -> Outcome {
        Outcome::Answered { status, body: b"answer".to_vec() }
    }

    #[test]
    fn two_hundreds_are_done_and_keep_the_answer() {
        let mut s = Status::new(1);
        s.after_delivery(answered(201), 5, &P, 0.5);
        assert_eq!((s.state, s.attempts, s.last_status), (State::Done, 1, Some(201)));
        assert_eq!(s.body, b"answer");
    }

    #[test]
    fn client_errors_fail_for_good_except_408_and_429() {
        let mut s = Status::new(0);
        s.after_delivery(answered(422), 5, &P, 0.5);
        assert_eq!(s.state, State::Failed);
        for retryable in [408, 429, 500, 503] {
            let mut s = Status::new(0);
            s.after_delivery(answered(retryable), 5, &P, 0.0);
            assert_eq!(s.state, State::Queued, "{retryable}");
            assert_eq!(s.next_at_ms, 5 + 50, "half the base back-off with no jitter");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_then_dead() {
        assert_eq!((1..=6).map(|a| backoff_ms(a, &P, 1.0)).collect::<Vec<_>>(), [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff_ms(3, &P, 0.0), 200);
        let mut s = Status::new(0);
        s.after_delivery(Outcome::Error("refused".into()), 10, &P, 1.0);
        assert_eq!((s.state, s.next_at_ms), (State::Queued, 110));
        s.after_delivery(answered(500), 200, &P, 1.0);
        assert_eq!((s.state, s.next_at_ms), (State::Queued, 400));
        s.after_delivery(answered(500), 500, &P, 1.0);
        assert_eq!((s.state, s.attempts), (State::Dead, 3));
        s.replay(900);
        assert_eq!((s.state, s.attempts, s.next_at_ms), (State::Queued, 0, 900));
    }

    #[test]
    fn status_round_trips() {
        let mut s = Status::new(7);
        s.after_delivery(Outcome::Error("connect refused".into()), 9, &P, 0.3);
        assert_eq!(Status::decode(&s.encode()), Some(s.clone()));
        s.after_delivery(answered(201), 20, &P, 0.3);
        assert_eq!(Status::decode(&s.encode()), Some(s));
        assert_eq!(Status::decode(&[9]), None);
    }
}
