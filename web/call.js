// One call: the signaling WebSocket and the WebRTC peer connection, rejoined with backoff.
//
// Every join is a new session: a new WebSocket, then a new RTCPeerConnection whose offer is sent
// once ICE gathering is complete (no trickle). Local media is owned by the page and survives
// rejoins, so the browser asks for the camera and microphone once.
//
// Events (CustomEvent.detail): "state" {state, text}, "message" (each server event),
// "track" {track, streams}, "session" {session}.

const VIDEO_SEND_FPS = 5;
const VIDEO_SEND_BITRATE = 300_000;

const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 10000];
const GATHER_TIMEOUT_MS = 3000;
const DISCONNECTED_GRACE_MS = 4000;
const PING_EVERY_MS = 5000;

export class Call extends EventTarget {
  constructor({ url, mode, loopbackOnly = false }) {
    super();
    this.videoSource = "camera"; // what the video track shows: camera | screen
    this.url = url;
    this.mode = mode;
    this.loopbackOnly = loopbackOnly;
    this.ws = null;
    this.pc = null;
    this.session = null;
    this.state = "idle";
    this.generation = 0; // bumps on every (re)join: late events of an old join are ignored
    this.attempt = 0;
    this.retryTimer = null;
    this.graceTimer = null;
    this.pingTimer = null;
    this.stopped = true;
    this.clockOffsetMs = 0; // server wall clock minus page wall clock
    this.bestRtt = Infinity;
    this.local = null; // {audio: MediaStreamTrack, video: MediaStreamTrack|null, stream}
    this.videoSender = null;
  }

  /** Join with the given local tracks (the page keeps them across rejoins). */
  start(local) {
    this.local = local;
    this.stopped = false;
    this.attempt = 0;
    this.#join();
  }

  /** Leave for good (hang-up): tell the server, close everything, do not rejoin. */
  stop() {
    this.stopped = true;
    this.#send({ type: "hangup" });
    this.#teardown();
    this.#setState("ended", "Call ended");
  }

  send(msg) {
    return this.#send(msg);
  }

  setMode(mode) {
    this.mode = mode;
    this.#send({ type: "mode", mode });
  }

  /** Swap the outgoing picture (camera <-> screen) without renegotiation. */
  async replaceVideo(track) {
    if (this.videoSender) await this.videoSender.replaceTrack(track);
  }

  // -- joining

  #join() {
    clearTimeout(this.retryTimer);
    this.#teardown();
    const gen = ++this.generation;
    this.#setState(this.attempt ? "reconnecting" : "connecting",
      this.attempt ? "Reconnecting…" : "Connecting…");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this.#fail(gen, `Cannot open the signaling connection: ${err.message}`);
      return;
    }
    this.ws = ws;
    ws.onmessage = (ev) => {
      if (gen !== this.generation) return;
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      this.#onServer(gen, msg);
    };
    ws.onclose = (ev) => {
      if (gen !== this.generation || this.stopped) return;
      const why = ev.code === 1009 ? "a message was too big" : "the server went away";
      this.#fail(gen, `Connection lost (${why}).`);
    };
    ws.onerror = () => {}; // onclose follows and handles it
  }

  #onServer(gen, msg) {
    switch (msg.type) {
      case "session":
        this.session = msg.session;
        this.iceServers = Array.isArray(msg.ice_servers) ? msg.ice_servers : [];
        this.dispatchEvent(new CustomEvent("session", { detail: { session: msg.session } }));
        this.#ping();
        this.pingTimer = setInterval(() => this.#ping(), PING_EVERY_MS);
        this.#offer(gen).catch((err) => this.#fail(gen, `Could not start the call: ${err.message}`));
        break;
      case "answer":
        if (this.pc && this.pc.signalingState === "have-local-offer") {
          this.pc.setRemoteDescription({ type: "answer", sdp: msg.sdp })
            .catch((err) => this.#fail(gen, `The server's answer was refused: ${err.message}`));
        }
        break;
      case "pong": {
        const now = performance.timeOrigin + performance.now();
        const sent = performance.timeOrigin + msg.t;
        const rtt = now - sent;
        if (rtt >= 0 && rtt <= this.bestRtt * 1.5 + 5) {
          this.bestRtt = Math.min(this.bestRtt, rtt);
          this.clockOffsetMs = msg.server_time * 1000 - (sent + rtt / 2);
        }
        break;
      }
      case "state":
        if (msg.state === "ended" && msg.source === "signaling" && !this.stopped) {
          this.#fail(gen, "The server ended the session.");
        }
        break;
      default:
        break;
    }
    this.dispatchEvent(new CustomEvent("message", { detail: msg }));
  }

  #ping() {
    this.#send({ type: "ping", t: performance.now() });
  }

  async #offer(gen) {
    const pc = new RTCPeerConnection({ iceServers: this.iceServers || [] });
    this.pc = pc;
    pc.onconnectionstatechange = () => this.#onPcState(gen);
    pc.ontrack = (ev) => {
      // Our packets are paced on a clock: play them as soon as they come, not after a cushion.
      if (ev.track.kind === "audio" && "jitterBufferTarget" in ev.receiver) {
        ev.receiver.jitterBufferTarget = 0;
      }
      if (gen === this.generation) {
        this.dispatchEvent(new CustomEvent("track", { detail: { track: ev.track, streams: ev.streams } }));
      }
    };
    const { audio, video, stream } = this.local;
    pc.addTrack(audio, stream);
    // The assistant looks at one picture per turn: a few frames a second are plenty, and they
    // spare the CPU of both ends (encoding here, decoding on the server) for the voice.
    this.videoSender = pc.addTransceiver(video || "video", {
      direction: "sendonly",
      streams: [stream],
      sendEncodings: [{ maxFramerate: VIDEO_SEND_FPS, maxBitrate: VIDEO_SEND_BITRATE }],
    }).sender;
    await pc.setLocalDescription();
    await gatherComplete(pc);
    if (gen !== this.generation) return;
    let sdp = pc.localDescription.sdp;
    if (this.loopbackOnly) sdp = onlyLoopbackCandidates(sdp);
    this.#send({ type: "offer", sdp, mode: this.mode, video: this.videoSource });
    this.#setState("negotiating", "Waiting for the server…");
  }

  #onPcState(gen) {
    if (gen !== this.generation) return;
    const s = this.pc.connectionState;
    clearTimeout(this.graceTimer);
    if (s === "connected") {
      this.attempt = 0;
      this.#setState("connected", "Connected");
    } else if (s === "failed") {
      this.#fail(gen, "The media connection failed.");
    } else if (s === "disconnected") {
      this.#setState("unstable", "Connection unstable…");
      this.graceTimer = setTimeout(() => this.#fail(gen, "The media connection dropped."),
        DISCONNECTED_GRACE_MS);
    }
  }

  #fail(gen, text) {
    if (gen !== this.generation || this.stopped) return;
    this.generation++; // ignore whatever the failed join still reports
    this.#teardown();
    const delay = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    this.attempt++;
    this.#setState("reconnecting", `${text} Retrying in ${Math.round(delay / 100) / 10} s…`);
    this.retryTimer = setTimeout(() => {
      if (!this.stopped) this.#join();
    }, delay);
  }

  #teardown() {
    clearInterval(this.pingTimer);
    clearTimeout(this.graceTimer);
    if (this.ws) {
      this.ws.onclose = this.ws.onmessage = null;
      this.ws.close();
      this.ws = null;
    }
    if (this.pc) {
      this.pc.onconnectionstatechange = this.pc.ontrack = null;
      this.pc.close();
      this.pc = null;
    }
    this.videoSender = null;
    this.session = null;
    this.bestRtt = Infinity;
  }

  #send(msg) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(msg));
      return true;
    }
    return false;
  }

  #setState(state, text) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, text } }));
  }
}

function gatherComplete(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => {
      if (pc.iceGatheringState === "complete") done();
    };
    const timer = setTimeout(done, GATHER_TIMEOUT_MS); // send what we have
    pc.addEventListener("icegatheringstatechange", check);
  });
}

/** Keep only 127.0.0.1 host candidates (tests on one machine; see shared/BROWSER.md). */
export function onlyLoopbackCandidates(sdp) {
  return sdp.split("\r\n")
    .filter((line) => !line.startsWith("a=candidate:") || / 127\.0\.0\.1 /.test(line))
    .join("\r\n");
}
