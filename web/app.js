// The call page: joins on load, shows the conversation and its timing, drives the buttons.
//
// URL parameters: mode=vad|ptt (turn mode at load), raw=1 (microphone without echo
// cancellation, noise suppression and gain control: for test WAVs), loopback=1 (offer only
// 127.0.0.1 candidates: tests on one machine). `window.parley` exposes the page's state and
// actions to tests and benchmarks (see docs/signaling.md).

import { AudioMeter } from "./audio.js";
import { Call } from "./call.js";
import { Conversation, setText } from "./conversation.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const MODES = ["vad", "ptt"];
const MIC_LOUD = 0.02; // RMS that counts as the user making sound (meter and indicator)
const HUSH_MS = 400; // a barge-in mutes the reply at most this long (its audio in flight drains)
const wallNow = () => performance.timeOrigin + performance.now();

const ui = {
  status: $("status"), statusText: $("status-text"), selfView: $("self-view"),
  videoOff: $("video-off"), sourceBadge: $("source-badge"), remoteAudio: $("remote-audio"),
  meter: $("mic-meter"), meterFill: $("mic-meter").firstElementChild,
  you: $("you-speaker"), youSub: $("you-sub"), ai: $("ai-speaker"), aiSub: $("ai-sub"),
  latency: $("latency"), session: $("session"), toast: $("toast"), toastText: $("toast-text"),
  talk: $("talk"), interrupt: $("interrupt"), share: $("share"), hangup: $("hangup"),
  hangupLabel: $("hangup-label"), shareLabel: $("share-label"), modeHint: $("mode-hint"),
};

const initialMode = MODES.includes(params.get("mode")) ? params.get("mode")
  : MODES.includes(localStorage.getItem("parley.mode")) ? localStorage.getItem("parley.mode")
  : "vad";
const raw = params.get("raw") === "1";
const wsUrl = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;

const meter = new AudioMeter();
const conversation = new Conversation($("turns"), $("empty"));
conversation.onPaint = () => updateLatency(); // the latency card follows the conversation's paints
const call = new Call({ url: wsUrl, mode: initialMode, loopbackOnly: params.get("loopback") === "1" });

// Everything a test or benchmark reads. Times are page wall-clock milliseconds.
const parley = {
  state: "idle", stateText: "", session: null, mode: initialMode, call, meter, conversation,
  turns: conversation.turns, onsets: [], offsets: [], micOnsets: [], micOffsets: [],
  errors: [], events: [], interrupts: [], hushes: [], unhushes: [],
  speakingTurn: 0, hushedUntilTurn: 0, // the newest turn heard; the turn a barge-in mute awaits
  states: [], sessions: [], remoteLoud: false, assistantState: "",
  mic: { level: 0, firstLoudAt: null, lastLoudAt: null },
  talking: false, sharing: false, local: null,
  get ws() { return call.ws; },
  get pc() { return call.pc; },
  get clockOffsetMs() { return call.clockOffsetMs; },
  talk, interrupt, setMode, hangup, rejoin, toggleShare,
  /** Plain JSON of every turn: text, voice to voice and stage times (ms after speech end). */
  summary() {
    return [...conversation.turns.values()].map((t) => ({
      turn: t.turn, user: t.user, assistant: t.assistant, done: t.done,
      interrupted: t.interrupted, noSpeech: t.noSpeech, v2v: t.v2v, onset: t.onset,
      speechEnd: t.speechEnd === null ? null : t.speechEnd - call.clockOffsetMs,
      stages: Object.fromEntries(conversation.breakdown(t).map((r) => [r.stage, r.ms])),
    }));
  },
};
window.parley = parley;

// ----------------------------------------------------------------------------- local media

async function openLocalMedia() {
  const audio = raw
    ? { echoCancellation: false, noiseSuppression: false, autoGainControl: false }
    : { echoCancellation: true, noiseSuppression: true, autoGainControl: true };
  const video = { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 15 } };
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio, video });
  } catch (err) {
    if (err.name === "NotAllowedError") throw err;
    stream = await navigator.mediaDevices.getUserMedia({ audio }); // no camera: voice only
    showError("No camera found: the call is voice only.");
  }
  const [micTrack] = stream.getAudioTracks();
  const [camTrack] = stream.getVideoTracks();
  return { audio: micTrack, video: camTrack || null, camera: camTrack || null, stream };
}

async function join() {
  setStatus("connecting", "Starting camera and microphone…");
  try {
    parley.local = await openLocalMedia();
  } catch (err) {
    const text = err.name === "NotAllowedError"
      ? "The microphone is blocked. Allow it in the browser's address bar, then press Rejoin."
      : `Cannot open the microphone: ${err.message}`;
    showError(text);
    setStatus("ended", "No microphone");
    setHangupButton(false);
    return;
  }
  ui.selfView.srcObject = parley.local.stream;
  ui.videoOff.hidden = Boolean(parley.local.video);
  meter.setMic(parley.local.audio);
  meter.resume();
  setHangupButton(true);
  call.start(parley.local);
}

function stopLocalMedia() {
  if (!parley.local) return;
  for (const t of parley.local.stream.getTracks()) t.stop();
  if (parley.screen) for (const t of parley.screen.getTracks()) t.stop();
  parley.screen = null;
  parley.sharing = false;
  parley.local = null;
  ui.selfView.srcObject = null;
}

// ----------------------------------------------------------------------------- call events

call.addEventListener("state", (ev) => setStatus(ev.detail.state, ev.detail.text));

call.addEventListener("session", (ev) => {
  parley.session = ev.detail.session;
  parley.sessions.push(ev.detail.session);
  ui.session.textContent = `session ${ev.detail.session}`;
  conversation.clear();
  parley.talking = false;
  ui.talk.setAttribute("aria-pressed", "false");
  parley.speakingTurn = 0; // turns count again from 1 in a new session
  unhush();
});

call.addEventListener("track", (ev) => {
  const { track, streams } = ev.detail;
  if (track.kind !== "audio") return;
  const stream = streams[0] || new MediaStream([track]);
  ui.remoteAudio.srcObject = stream; // WebAudio hears a remote stream only if an element plays it
  ui.remoteAudio.play().catch(() => showError("Tap anywhere to hear Parley."));
  meter.setRemote(stream).catch((err) => console.warn("onset detector unavailable", err));
});

call.addEventListener("message", (ev) => {
  const msg = ev.detail;
  msg.receivedAt = wallNow();
  parley.events.push(msg);
  if (parley.events.length > 500) parley.events.splice(0, 100);
  conversation.clockOffsetMs = call.clockOffsetMs;
  switch (msg.type) {
    case "error":
      parley.errors.push(msg);
      showError(msg.text || "Something went wrong.");
      break;
    case "state":
      parley.states.push(msg);
      onMediaState(msg);
      conversation.apply(msg);
      break;
    case "metric":
    case "transcript":
    case "token":
    case "sentence":
    case "interrupt":
      conversation.apply(msg);
      if (msg.type === "interrupt") {
        parley.assistantState = "";
        hush(msg.turn);
      }
      updateSpeakers();
      break;
    default:
      break;
  }
});

function onMediaState(msg) {
  if (msg.state === "assistant_speaking" && Number.isInteger(msg.turn)) {
    parley.speakingTurn = Math.max(parley.speakingTurn, msg.turn);
    if (parley.hushedUntilTurn && msg.turn >= parley.hushedUntilTurn) unhush();
  }
  if (msg.state === "user_speaking") parley.userSpeaking = true;
  if (msg.state === "listening") parley.userSpeaking = false;
  if (msg.state === "assistant_speaking" || msg.state === "assistant_done") {
    parley.assistantState = msg.state;
  }
  updateSpeakers();
}

// ----------------------------------------------------------------------------- remote audio

let hushTimer = null;

/** Barge-in, heard at once: the reply that was playing is muted here, without waiting for the
 * audio already on its way (up to ~100 ms in the network and the jitter buffer) to play out.
 * Sound comes back with turn `turn` (its "assistant_speaking" state, which the server sends as
 * it hands the first packet to WebRTC, so ahead of the audio), or HUSH_MS after the barge-in,
 * whichever comes first: by then the old audio has played out, and a late message can never
 * clip the start of the answer. */
function hush(turn) {
  if (parley.hushedUntilTurn >= turn) return;
  parley.hushedUntilTurn = turn;
  parley.hushes.push({ at: wallNow(), turn });
  ui.remoteAudio.muted = true;
  meter.setRemoteMuted(true);
  clearTimeout(hushTimer);
  hushTimer = setTimeout(unhush, HUSH_MS);
}

function unhush() {
  clearTimeout(hushTimer);
  if (parley.hushedUntilTurn) parley.unhushes.push({ at: wallNow(), turn: parley.hushedUntilTurn });
  parley.hushedUntilTurn = 0;
  ui.remoteAudio.muted = false;
  meter.setRemoteMuted(false);
}

meter.addEventListener("onset", (ev) => {
  parley.onsets.push({ at: ev.detail.at, peak: ev.detail.peak });
  conversation.clockOffsetMs = call.clockOffsetMs;
  conversation.heard(ev.detail.at);
});
meter.addEventListener("offset", (ev) => parley.offsets.push({ at: ev.detail.at }));
meter.addEventListener("mic-onset", (ev) => parley.micOnsets.push({ at: ev.detail.at }));
meter.addEventListener("mic-offset", (ev) => parley.micOffsets.push({ at: ev.detail.at }));
meter.addEventListener("level", (ev) => {
  parley.remoteLoud = ev.detail.loud;
  parley.remoteLevel = ev.detail.rms;
  updateSpeakers();
});

// ----------------------------------------------------------------------------- mic meter

setInterval(() => {
  const level = meter.micLevel();
  parley.mic.level = level;
  if (level > MIC_LOUD) {
    parley.mic.lastLoudAt = wallNow();
    parley.mic.firstLoudAt ??= parley.mic.lastLoudAt;
  }
  const pct = Math.min(100, Math.round(Math.sqrt(level) * 180));
  if (ui.meter.getAttribute("aria-valuenow") !== String(pct)) {
    ui.meterFill.style.transform = `scaleX(${pct / 100})`;
    ui.meter.setAttribute("aria-valuenow", String(pct));
  }
  updateSpeakers();
}, 50);

// ----------------------------------------------------------------------------- display

function setStatus(state, text) {
  parley.state = state;
  parley.stateText = text;
  ui.status.dataset.state = state;
  ui.statusText.textContent = text;
  document.body.dataset.call = state;
}

function updateSpeakers() {
  const micActive = parley.mic.level > MIC_LOUD;
  const youActive = parley.talking || parley.userSpeaking || (parley.mode === "vad" && micActive);
  ui.you.classList.toggle("active", Boolean(youActive));
  setText(ui.youSub, parley.talking ? "talking" : parley.userSpeaking ? "speaking"
    : parley.mode === "ptt" ? "hold to talk" : "listening");
  const latest = conversation.turns.get(conversation.latest);
  const thinking = latest && latest.speechEnd !== null && latest.onset === null
    && !latest.noSpeech && !latest.interrupted && !latest.done
    && wallNow() - (latest.speechEnd - call.clockOffsetMs) < 20000;
  const speaking = parley.remoteLoud;
  ui.ai.classList.toggle("active", speaking);
  ui.ai.classList.toggle("thinking", Boolean(thinking) && !speaking);
  setText(ui.aiSub, speaking ? "speaking" : thinking ? "thinking…" : "ready");
}

function updateLatency() {
  renderWaterfall();
  const figures = [...conversation.turns.values()].map((t) => t.v2v).filter((v) => v !== null);
  if (!figures.length) return;
  const sorted = [...figures].sort((a, b) => a - b);
  const median = sorted[Math.floor(sorted.length / 2)];
  ui.latency.hidden = false;
  setText(ui.latency.querySelector(".last"), `${Math.round(figures.at(-1))} ms`);
  setText(ui.latency.querySelector(".median"),
    figures.length > 1 ? `median ${Math.round(median)} ms over ${figures.length}` : "voice to voice");
}

/** The latest timed turn's stages as bars on one time axis (speech end at 0). */
function renderWaterfall() {
  const turns = [...conversation.turns.values()].filter((t) => conversation.waterfall(t).length);
  const t = turns.at(-1);
  if (!t) return;
  const rows = conversation.waterfall(t);
  const key = `${t.turn}:${rows.map((r) => `${r.stage}=${Math.round(r.ms)}`).join()}`;
  const card = $("waterfall-card");
  if (card.dataset.key === key) return; // painted already
  card.dataset.key = key;
  const span = Math.max(...rows.map((r) => r.ms), 1);
  let previous = 0;
  const items = rows.map(({ stage, label, ms }) => {
    const li = document.createElement("li");
    li.className = stage === "heard" ? "heard" : "";
    li.innerHTML = '<span class="label"></span><span class="track"><span class="bar"></span></span>'
      + '<span class="ms"></span>';
    li.querySelector(".label").textContent = label;
    li.querySelector(".ms").textContent = `${Math.round(ms)} ms`;
    const bar = li.querySelector(".bar");
    const from = stage === "heard" ? 0 : Math.max(0, Math.min(previous, ms));
    bar.style.setProperty("--from", `${(from / span) * 100}%`);
    bar.style.setProperty("--to", `${(Math.max(ms, 0) / span) * 100}%`);
    if (stage !== "heard") previous = Math.max(previous, ms);
    return li;
  });
  $("waterfall").replaceChildren(...items);
  card.hidden = false;
}

let toastTimer = null;
function showError(text) {
  ui.toastText.textContent = text;
  ui.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { ui.toast.hidden = true; }, 8000);
}
$("toast-close").addEventListener("click", () => { ui.toast.hidden = true; });

// ----------------------------------------------------------------------------- actions

function talk(pressed) {
  if (parley.mode !== "ptt" || pressed === parley.talking) return false;
  parley.talking = pressed;
  ui.talk.setAttribute("aria-pressed", String(pressed));
  meter.resume();
  if (pressed) hush(parley.speakingTurn + 1); // a press starts a new turn: the reply stops now
  call.send({ type: "talk", pressed });
  updateSpeakers();
  return true;
}

function interrupt() {
  meter.resume();
  const at = wallNow();
  if (call.send({ type: "interrupt" })) {
    parley.interrupts.push({ at });
    hush(parley.speakingTurn + 1);
  }
}

function setMode(mode) {
  if (!MODES.includes(mode)) return;
  if (parley.talking) talk(false);
  parley.mode = mode;
  localStorage.setItem("parley.mode", mode);
  call.setMode(mode);
  document.body.dataset.mode = mode;
  for (const input of document.querySelectorAll('input[name="mode"]')) {
    input.checked = input.value === mode;
  }
  ui.talk.disabled = mode !== "ptt";
  ui.modeHint.textContent = mode === "ptt"
    ? "Hold the Talk button or the Space bar while you speak."
    : "Hands-free: just talk. Parley answers when you pause.";
  updateSpeakers();
}

function hangup() {
  call.stop();
  stopLocalMedia();
  ui.remoteAudio.srcObject = null;
  setHangupButton(false);
}

function rejoin() {
  if (call.stopped) join();
}

async function toggleShare() {
  if (!parley.local) return;
  if (parley.sharing) {
    stopSharing();
    return;
  }
  let screen;
  try {
    screen = await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: 15 }, audio: false });
  } catch (err) {
    if (err.name !== "NotAllowedError") showError(`Cannot share the screen: ${err.message}`);
    return;
  }
  const [track] = screen.getVideoTracks();
  track.addEventListener("ended", stopSharing); // the browser's own "Stop sharing" button
  parley.screen = screen;
  parley.sharing = true;
  parley.local.video = track;
  await call.replaceVideo(track);
  call.videoSource = "screen";
  call.send({ type: "video", source: "screen" });
  ui.selfView.srcObject = screen;
  ui.videoOff.hidden = true;
  setShareButton(true);
}

function stopSharing() {
  if (!parley.sharing) return;
  for (const t of parley.screen.getTracks()) t.stop();
  parley.screen = null;
  parley.sharing = false;
  if (parley.local) {
    parley.local.video = parley.local.camera;
    call.replaceVideo(parley.local.camera).catch(() => {});
    call.videoSource = "camera";
    call.send({ type: "video", source: "camera" });
    ui.selfView.srcObject = parley.local.stream;
    ui.videoOff.hidden = Boolean(parley.local.camera);
  }
  setShareButton(false);
}

function setShareButton(sharing) {
  ui.share.setAttribute("aria-pressed", String(sharing));
  ui.shareLabel.textContent = sharing ? "Show camera" : "Share screen";
  ui.sourceBadge.textContent = sharing ? "Screen" : "Camera";
  document.body.dataset.sharing = sharing ? "1" : "";
}

function setHangupButton(inCall) {
  ui.hangup.classList.toggle("danger", inCall);
  ui.hangup.classList.toggle("primary", !inCall);
  ui.hangupLabel.textContent = inCall ? "Hang up" : "Rejoin";
  ui.share.disabled = !inCall;
  ui.interrupt.disabled = !inCall;
}

// ----------------------------------------------------------------------------- input

const releaseTalk = () => talk(false);
ui.talk.addEventListener("pointerdown", (ev) => {
  ui.talk.setPointerCapture(ev.pointerId);
  talk(true);
});
ui.talk.addEventListener("pointerup", releaseTalk);
ui.talk.addEventListener("pointercancel", releaseTalk);
ui.talk.addEventListener("lostpointercapture", releaseTalk);
ui.talk.addEventListener("contextmenu", (ev) => ev.preventDefault());
ui.interrupt.addEventListener("click", interrupt);
ui.share.addEventListener("click", toggleShare);
ui.hangup.addEventListener("click", () => (call.stopped ? rejoin() : hangup()));
for (const input of document.querySelectorAll('input[name="mode"]')) {
  input.addEventListener("change", () => input.checked && setMode(input.value));
}

const typing = (el) => el.closest("input[type=text], textarea, select, [contenteditable]");
window.addEventListener("keydown", (ev) => {
  meter.resume();
  if (ev.code === "Space" && parley.mode === "ptt" && !typing(ev.target)) {
    ev.preventDefault(); // also keeps Space from clicking a focused button
    if (!ev.repeat) talk(true);
  } else if (ev.key === "Escape") {
    interrupt();
  }
});
window.addEventListener("keyup", (ev) => {
  if (ev.code === "Space" && parley.mode === "ptt" && !typing(ev.target)) {
    ev.preventDefault();
    talk(false);
  }
});
window.addEventListener("blur", releaseTalk); // a held key is lost with the focus
window.addEventListener("pointerdown", () => {
  meter.resume();
  if (ui.remoteAudio.paused && ui.remoteAudio.srcObject) ui.remoteAudio.play().catch(() => {});
});
window.addEventListener("pagehide", () => call.send({ type: "hangup" }));

setMode(initialMode);
setHangupButton(true);
join();
