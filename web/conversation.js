// The conversation: one entry per turn (what the user said, the reply as it streams, its timing).
//
// Stage times arrive as metrics in the server's wall clock; `clockOffsetMs` (server minus page)
// converts them. Voice-to-voice is the first audible reply sample heard on this page minus the
// end of the user's speech.
//
// Events only change the entries; the page is painted at most once per animation frame, however
// many tokens and metrics arrive in it (a reply streams ~50 events a second, and each paint lays
// out the conversation again: on a small machine the browser's work competes with the models').
//
// A reply's words appear as it speaks: until its voice starts (the server's "assistant_speaking"
// for the turn, or its first sound heard here) its tokens and stage figures are kept, not
// painted, so that the page does not draw through the very moments the reply is being made,
// and the text does not run ahead of the voice. A reply that is never heard (no voice, a muted
// engine) shows TEXT_HOLD_MS after its first words.

const TEXT_HOLD_MS = 1500;

export const STAGES = [
  ["transcript", "words"],
  ["first_token", "first token"],
  ["first_sentence", "first sentence"],
  ["first_packet", "first audio"],
  ["first_sent", "sent"],
];

/** Changes the DOM only when the text changed: the page's indicators update 20-40 times a
 * second, and every write makes the page lay out and paint again, CPU that the user's device
 * (or, in the benchmark, the two cores shared with the models) needs for the call. */
export function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

export class Conversation {
  constructor(listEl, emptyEl) {
    this.listEl = listEl;
    this.emptyEl = emptyEl;
    this.turns = new Map(); // turn number -> entry
    this.latest = 0;
    this.clockOffsetMs = 0;
    this.dirty = new Set(); // entries changed since the last paint
    this.frame = 0; // the requested animation frame, 0 when none
    this.onPaint = null; // called after each paint (the page's latency card)
  }

  entry(turn) {
    let t = this.turns.get(turn);
    if (!t) {
      t = {
        turn, user: "", userPartial: false, assistant: "", tokens: new Set(), sentences: new Map(),
        speechEnd: null, stages: {}, onset: null, v2v: null, done: false,
        interrupted: false, noSpeech: false, el: null, voiced: false, holdTimer: 0,
      };
      this.turns.set(turn, t);
      this.latest = Math.max(this.latest, turn);
    }
    return t;
  }

  /** A server event for the conversation; returns the entry it touched, if any. */
  apply(msg) {
    if (!Number.isInteger(msg.turn) || msg.turn <= 0) return null;
    const t = this.entry(msg.turn);
    switch (msg.type) {
      case "interrupt":
        if (msg.void) this.#forget(msg.turn - 1); // spoken on through: the new turn has it all
        for (const [n, old] of this.turns) {
          if (n < msg.turn && old.assistant && !old.done) {
            old.interrupted = true; // what it said so far, marked as cut off; if it had
            clearTimeout(old.holdTimer); // not spoken yet, nothing of it was heard: none shows
            this.render(old);
          }
        }
        return t;
      case "transcript":
        if (msg.partial && t.user && !t.userPartial) break; // the final words came already
        t.user = msg.text;
        t.userPartial = Boolean(msg.partial); // words so far, the user still speaking
        break;
      case "token":
        if (t.tokens.has(msg.index)) return t;
        t.tokens.add(msg.index);
        t.assistant += msg.text;
        break;
      case "sentence":
        t.sentences.set(msg.index, msg.text);
        if (t.tokens.size === 0) {
          t.assistant = [...t.sentences.entries()].sort((a, b) => a[0] - b[0])
            .map(([, s]) => s).filter(Boolean).join(" ");
        }
        if (msg.final) t.done = true;
        break;
      case "metric":
        if (msg.stage === "speech_end") t.speechEnd = msg.at * 1000;
        else t.stages[msg.stage] = msg;
        break;
      case "state":
        if (msg.state === "assistant_speaking") {
          this.#voice(t);
          return t;
        }
        if (msg.state !== "no_speech") return t; // the speakers' panel shows the others
        t.noSpeech = true;
        if (t.userPartial) t.user = ""; // the caption was not speech after all
        break;
      default:
        return null;
    }
    const reply = msg.type === "token" || msg.type === "sentence"
      || (msg.type === "metric" && msg.stage !== "speech_end"); // the reply's, not the user's
    if (reply && !t.voiced) this.#hold(t);
    else this.render(t);
    return t;
  }

  /** Keep ``t``'s reply unpainted until its voice starts, at most TEXT_HOLD_MS. */
  #hold(t) {
    this.dirty.add(t);
    if (!t.holdTimer) t.holdTimer = setTimeout(() => this.#voice(t), TEXT_HOLD_MS);
  }

  /** ``t``'s reply is being spoken (or will never be): its words show from now on. */
  #voice(t) {
    clearTimeout(t.holdTimer);
    t.voiced = true;
    this.render(t);
  }

  /** The reply's first audible sample at `atMs` (page wall clock): the latest waiting turn's. */
  heard(atMs) {
    for (let n = this.latest; n > 0; n--) {
      const t = this.turns.get(n);
      if (!t || t.speechEnd === null) continue;
      if (t.onset !== null) return null; // the latest answered turn is already timed
      const speechEndPage = t.speechEnd - this.clockOffsetMs;
      if (atMs < speechEndPage) return null;
      t.onset = atMs;
      t.v2v = atMs - speechEndPage;
      this.#voice(t);
      return t;
    }
    return null;
  }

  /** Rows for the latency card: each stage, then the first sound heard, from speech end (once
   * the reply speaks, like its words). */
  waterfall(t) {
    if (!t.voiced) return [];
    const rows = this.breakdown(t);
    if (t.v2v !== null) rows.push({ stage: "heard", label: "heard", ms: t.v2v });
    return rows;
  }

  /** Milliseconds from the end of speech to each stage, server clock on both sides. */
  breakdown(t) {
    const out = [];
    if (t.speechEnd === null) return out;
    for (const [stage, label] of STAGES) {
      const m = t.stages[stage];
      if (m) out.push({ stage, label, ms: m.at * 1000 - t.speechEnd });
    }
    return out;
  }

  #forget(turn) {
    const old = this.turns.get(turn);
    if (!old) return;
    clearTimeout(old.holdTimer);
    old.el?.remove();
    this.dirty.delete(old);
    this.turns.delete(turn);
  }

  /** Paint ``t`` with the next animation frame. */
  render(t) {
    this.dirty.add(t);
    if (!this.frame) this.frame = requestAnimationFrame(() => this.paint());
  }

  /** Paint every changed entry now; the log keeps to its end if it was there. */
  paint() {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.frame = 0;
    const log = this.listEl.parentElement;
    const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 160;
    for (const t of this.dirty) this.#paintEntry(t);
    this.dirty.clear();
    if (atEnd) log.scrollTop = log.scrollHeight;
    this.onPaint?.();
  }

  #paintEntry(t) {
    const waiting = t.speechEnd !== null && !t.noSpeech && !t.user;
    const visible = t.user || t.assistant || waiting;
    if (!visible) {
      if (t.el) t.el.hidden = true;
      return;
    }
    if (!t.el) t.el = this.#create(t);
    t.el.hidden = false;
    const [user, reply, timing] = [".user .text", ".assistant .text", ".timing"]
      .map((sel) => t.el.querySelector(sel));
    setText(user, t.user || (waiting ? "…" : ""));
    user.parentElement.hidden = !t.user && !waiting;
    user.parentElement.classList.toggle("pending", !t.user);
    user.parentElement.classList.toggle("live", Boolean(t.user && t.userPartial));
    const said = t.voiced ? t.assistant : "";
    setText(reply, said);
    const bubble = reply.parentElement;
    bubble.hidden = !said;
    bubble.setAttribute("aria-busy", String(!t.done && !t.interrupted));
    bubble.classList.toggle("interrupted", t.interrupted);
    bubble.classList.toggle("streaming", !t.done && !t.interrupted);
    const parts = t.voiced ? this.#timing(t) : []; // the figures come with the voice
    const key = parts.map((p) => p.text).join("|");
    if (timing.dataset.key !== key) { // rebuilt only when a figure changed
      timing.dataset.key = key;
      timing.replaceChildren(...parts.map(({ cls, text, title }) => {
        const span = document.createElement("span");
        span.className = cls;
        span.textContent = text;
        if (title) span.title = title;
        return span;
      }));
    }
    timing.hidden = parts.length === 0;
    this.emptyEl.hidden = true;
  }

  #create(t) {
    const el = document.createElement("li");
    el.className = "turn";
    el.dataset.turn = t.turn;
    el.innerHTML = `
      <div class="bubble user"><span class="who">You</span><p class="text"></p></div>
      <div class="bubble assistant"><span class="who">Parley</span><p class="text"></p></div>
      <div class="timing"></div>`;
    // Keep turns in order even if a later one shows first.
    const after = [...this.listEl.children].find((li) => Number(li.dataset.turn) > t.turn);
    this.listEl.insertBefore(el, after || null);
    return el;
  }

  /** The turn's timing line as plain data: a paint builds spans only when it changed. */
  #timing(t) {
    const parts = [];
    if (t.v2v !== null) {
      parts.push({ cls: "v2v", text: `${Math.round(t.v2v)} ms`,
        title: "voice to voice: end of your speech to the first sound of the reply" });
    }
    for (const { label, ms } of this.breakdown(t)) {
      parts.push({ cls: "t-stage", text: `${label} ${Math.round(ms)}` });
    }
    return parts;
  }

  clear() {
    for (const t of this.turns.values()) clearTimeout(t.holdTimer);
    this.dirty.clear();
    this.turns.clear();
    this.latest = 0;
    this.listEl.replaceChildren();
    this.emptyEl.hidden = false;
  }
}
