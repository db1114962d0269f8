// WebAudio for measuring, never for playing: the mic level and the assistant's sound onsets.
//
// The remote stream is played by an <audio> element (WebAudio only receives a remote WebRTC
// stream when one is attached); a copy goes to the onset worklet, whose output is silent.
// Worklet times are AudioContext times; `wallMs` turns them into page wall-clock milliseconds.

export class AudioMeter extends EventTarget {
  constructor() {
    super();
    this.ctx = new AudioContext({ latencyHint: "interactive" });
    this.ready = this.ctx.audioWorklet.addModule(new URL("./onset-worklet.js", import.meta.url));
    this.micAnalyser = null;
    this.micSource = null;
    this.remoteSource = null;
    this.remoteGain = null; // between the remote stream and its detector: muted on a barge-in
    this.remoteMuted = false;
    this.detector = null;
    this.offsetMs = Infinity; // page wall-clock ms minus context ms (smallest seen)
    this.buffer = null;
    this.#calibrate();
    this.calibrateTimer = setInterval(() => this.#calibrate(), 1000);
  }

  /** Browsers start an AudioContext suspended until a user gesture, except in tests. */
  resume() {
    if (this.ctx.state === "suspended") this.ctx.resume().catch(() => {});
  }

  /** Page wall-clock milliseconds of a context time in seconds. */
  wallMs(contextTime) {
    return contextTime * 1000 + this.offsetMs;
  }

  #calibrate() {
    // currentTime steps once per render quantum and lags real time; the smallest offset is best.
    if (this.ctx.state !== "running") return;
    const offset = performance.timeOrigin + performance.now() - this.ctx.currentTime * 1000;
    if (offset < this.offsetMs || offset - this.offsetMs > 50) this.offsetMs = offset;
  }

  setMic(track) {
    if (this.micSource) this.micSource.disconnect();
    this.micSource = this.ctx.createMediaStreamSource(new MediaStream([track]));
    this.micAnalyser = this.ctx.createAnalyser();
    this.micAnalyser.fftSize = 1024;
    this.buffer = new Float32Array(this.micAnalyser.fftSize);
    this.micSource.connect(this.micAnalyser);
    this.#detectMic().catch((err) => console.warn("mic onset detector unavailable", err));
  }

  /** Sample-exact start and end of the user's sound in the mic signal ("mic-onset"/"mic-offset"):
   * where voice-to-voice latency starts, measured on the same clock as the reply's onset. */
  async #detectMic() {
    await this.ready;
    if (!this.micDetector) {
      this.micDetector = this.#detector("mic-");
    }
    this.micSource.connect(this.micDetector);
  }

  #detector(prefix) {
    const node = new AudioWorkletNode(this.ctx, "onset-detector", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { threshold: 0.003, gapMs: 250 },
    });
    node.connect(this.ctx.destination); // pulls the graph; the output is silent
    node.port.onmessage = (ev) => {
      const d = ev.data;
      this.dispatchEvent(new CustomEvent(prefix + d.type, {
        detail: { ...d, at: this.wallMs(d.time) },
      }));
    };
    return node;
  }

  /** Mic RMS level now, 0..1. */
  micLevel() {
    if (!this.micAnalyser) return 0;
    this.micAnalyser.getFloatTimeDomainData(this.buffer);
    let sum = 0;
    for (const v of this.buffer) sum += v * v;
    return Math.sqrt(sum / this.buffer.length);
  }

  async setRemote(stream) {
    await this.ready;
    if (this.remoteSource) this.remoteSource.disconnect();
    if (!this.detector) {
      this.detector = this.#detector("");
      // The detector hears what the <audio> element lets through.
      this.remoteGain = this.ctx.createGain();
      this.remoteGain.gain.value = this.remoteMuted ? 0 : 1;
      this.remoteGain.connect(this.detector);
    }
    this.remoteSource = this.ctx.createMediaStreamSource(stream);
    this.remoteSource.connect(this.remoteGain);
  }

  /** Silence (or restore) the reply for the onset detector, as the <audio> element is. */
  setRemoteMuted(muted) {
    this.remoteMuted = muted;
    if (this.remoteGain) this.remoteGain.gain.setValueAtTime(muted ? 0 : 1, this.ctx.currentTime);
  }
}
