// AudioWorklet on the remote (assistant) stream: timestamps where sound starts and stops.
//
// An "onset" is the first sample above the threshold after at least `gapMs` of silence; an
// "offset" is the last loud sample, reported once `gapMs` of silence has followed it. Times are
// in the AudioContext's clock (seconds, sample-exact); the page maps them to wall-clock time.
// A "level" message (RMS over ~50 ms) drives the assistant's speaking indicator.

class OnsetDetector extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.threshold = o.threshold ?? 0.003; // about -50 dBFS: Opus silence decodes to 0
    this.gapFrames = Math.round(((o.gapMs ?? 250) / 1000) * sampleRate);
    this.loud = false;
    this.lastLoudFrame = -Infinity; // absolute frame index of the last loud sample
    this.sumSquares = 0;
    this.levelFrames = 0;
    this.levelEvery = Math.round(0.05 * sampleRate);
  }

  process(inputs) {
    const input = inputs[0];
    const n = input && input.length ? input[0].length : 128;
    const start = currentFrame; // context frame of this block's first sample
    if (input && input.length) {
      for (let i = 0; i < n; i++) {
        let peak = 0;
        for (let c = 0; c < input.length; c++) {
          const v = Math.abs(input[c][i]);
          if (v > peak) peak = v;
          this.sumSquares += input[c][i] * input[c][i] / input.length;
        }
        const at = start + i;
        if (peak > this.threshold) {
          if (at - this.lastLoudFrame >= this.gapFrames) {
            if (this.loud) { // the gap ended inside this block: report the sound that ended
              this.port.postMessage({ type: "offset", time: (this.lastLoudFrame + 1) / sampleRate });
            }
            this.port.postMessage({ type: "onset", time: at / sampleRate, peak });
          }
          this.loud = true;
          this.lastLoudFrame = at;
        }
      }
    }
    const end = start + n;
    if (this.loud && end - this.lastLoudFrame >= this.gapFrames) {
      this.loud = false;
      this.port.postMessage({ type: "offset", time: (this.lastLoudFrame + 1) / sampleRate });
    }
    this.levelFrames += n;
    if (this.levelFrames >= this.levelEvery) {
      const rms = Math.sqrt(this.sumSquares / this.levelFrames);
      this.port.postMessage({ type: "level", rms, loud: this.loud, time: end / sampleRate });
      this.sumSquares = 0;
      this.levelFrames = 0;
    }
    return true;
  }
}

registerProcessor("onset-detector", OnsetDetector);
