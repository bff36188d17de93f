"""Chat screen: the transcript (bubbles, collapsible reasoning, tool cards) and the input row.

All state lives in ChatController; this screen only draws its items and forwards button presses.
"""

from __future__ import annotations

from kivy.clock import Clock
from kivy.metrics import dp, sp
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.progressbar import ProgressBar
from kivy.uix.screenmanager import Screen
from kivy.uix.scrollview import ScrollView
from kivy.uix.textinput import TextInput
from kivy.uix.widget import Widget

from .transcript import IDLE, Bubble, ChatController, ToolCard, thinking_label
from .widgets import ACCENT, ERROR, MONO, MUTED, SURFACE, TEXT, TOOL, TOOL_EDGE, USER, Panel, Text, button, row

ROLE_COLORS = {"user": USER, "assistant": SURFACE, "error": ERROR}


class BubbleView(Panel):
    def __init__(self, chat: ChatController, index: int):
        super().__init__(color=ROLE_COLORS[chat.items[index].role])
        self.chat, self.index = chat, index
        self.reasoning_button = button("", on_press=lambda: chat.toggle_reasoning(index), color=(0, 0, 0, 0),
                                       size_hint=(1, None), height=dp(28), halign="left")
        self.reasoning_button.bind(size=lambda b, s: setattr(b, "text_size", s))
        self.reasoning_button.color = MUTED
        self.reasoning_button.font_name = "DejaVuSans"  # has the triangles; Roboto does not
        self.reasoning_button.font_size = sp(14)
        self.reasoning = Text(color=MUTED, italic=True, font_size=sp(14))
        self.body = Text()
        self.footer = Text(color=MUTED, font_size=sp(12))
        self.update(chat.items[index])

    def update(self, item: Bubble) -> None:
        self.clear_widgets()
        if item.reasoning:
            words = len(item.reasoning.split())
            arrow, action = ("\u25bc", "hide") if item.show_reasoning else ("\u25b6", "show")
            self.reasoning_button.text = f"{arrow} Reasoning ({words} words): tap to {action}"
            self.add_widget(self.reasoning_button)
            if item.show_reasoning:
                self.reasoning.text = item.reasoning.strip()
                self.add_widget(self.reasoning)
        text = item.text.strip()
        if text or not item.reasoning:
            self.body.text = text or "..."
            self.add_widget(self.body)
        if item.footer:
            self.footer.text = item.footer
            self.add_widget(self.footer)


class ToolCardView(Panel):
    def __init__(self, card: ToolCard):
        super().__init__(color=TOOL, edge=TOOL_EDGE)
        self.title = Text(markup=True, font_size=sp(13), color=MUTED)
        self.call = Text(font_name=MONO, font_size=sp(14))
        self.result = Text(font_name=MONO, font_size=sp(14), color=TOOL_EDGE)
        for w in (self.title, self.call, self.result):
            self.add_widget(w)
        self.update(card)

    def update(self, card: ToolCard) -> None:
        self.title.text = f"TOOL CALL  [b]{card.name}[/b]"
        self.call.text = card.call_text if not card.error else "(could not read the call)"
        self.result.text = f"-> {card.result_text}"


class ChatScreen(Screen):
    def __init__(self, chat: ChatController, busy, **kwargs):
        """`busy()`: why the app cannot start a turn now (e.g. a benchmark is running), or None."""
        super().__init__(name="chat", **kwargs)
        self.chat, self.busy = chat, busy
        self.views: list[Widget] = []
        layout = BoxLayout(orientation="vertical", padding=dp(10), spacing=dp(8))
        self.scroll = ScrollView(do_scroll_x=False, bar_width=dp(4))
        self.list = BoxLayout(orientation="vertical", size_hint_y=None, spacing=dp(10), padding=(0, dp(4)))
        self.list.bind(minimum_height=self.list.setter("height"))
        self.scroll.add_widget(self.list)
        self.hint = Text(text="Ask something. Demo tools: calculator, current_time, battery.", color=MUTED)
        self.status = Text(color=MUTED, font_size=sp(13))
        # shown only while a model loads in the background (height 0 otherwise)
        self.load_bar = ProgressBar(max=1, value=0, size_hint_y=None, height=0, opacity=0)
        self._was_loading = False
        self.input = TextInput(multiline=False, hint_text="Message", font_size=sp(16), size_hint_y=None,
                               height=dp(44), background_color=SURFACE, foreground_color=TEXT,
                               cursor_color=ACCENT, hint_text_color=MUTED, padding=(dp(10), dp(11)))
        self.input.bind(on_text_validate=lambda *_: self.send())
        self.send_button = button("Send", self.send, width=dp(72))
        self.cancel_button = button("Cancel", self.chat.cancel, color=ERROR, width=dp(72))
        self.new_button = button("New", self.new_chat, color=SURFACE, width=dp(60))
        self.think_button = button(thinking_label(chat.reasoning_budget), self.cycle_thinking, color=SURFACE,
                                   width=dp(110))
        layout.add_widget(self.load_bar)
        layout.add_widget(self.scroll)
        layout.add_widget(row(self.status, self.think_button, height=dp(36)))
        layout.add_widget(row(self.input, self.send_button, self.cancel_button, self.new_button))
        self.add_widget(layout)
        chat.listeners.append(self.on_change)
        self.on_change(None)

    def show_loading(self, progress: tuple[float, str] | None) -> None:
        """The app's model load: `(fraction, text)` while it runs, None once it is over."""
        if progress is None:
            if self._was_loading:
                self._was_loading = False
                self.load_bar.height, self.load_bar.opacity = 0, 0
                if self.status.text.startswith(("loading ", "the model is still loading")):
                    self.status.text = ""
            return
        self._was_loading = True
        self.load_bar.height, self.load_bar.opacity = dp(6), 1
        self.load_bar.value = progress[0]
        if not self.status.text.startswith("the model is still loading"):
            self.status.text = progress[1]

    def send(self) -> None:
        reason = self.busy() or self.chat.send(self.input.text)
        if reason:
            self.status.text = reason
        else:
            self.input.text = ""

    def cycle_thinking(self) -> None:
        self.think_button.text = self.chat.cycle_thinking()

    def new_chat(self) -> None:
        if self.chat.state == IDLE:
            self.chat.reset()

    def on_change(self, index: int | None) -> None:
        items = self.chat.items
        if index is None or index > len(self.views) or len(self.views) > len(items):
            self.list.clear_widgets()
            self.views = []
            if not items:
                self.list.add_widget(self.hint)
        elif not self.views and self.hint.parent:
            self.list.remove_widget(self.hint)
        for i in range(len(self.views), len(items)):  # new items
            view = ToolCardView(items[i]) if isinstance(items[i], ToolCard) else BubbleView(self.chat, i)
            self.views.append(view)
            self.list.add_widget(view)
        if index is not None and index < len(self.views):
            self.views[index].update(items[index])
        running = self.chat.state != IDLE
        self.send_button.disabled, self.cancel_button.disabled = running, not running
        self.new_button.disabled = running
        if running:
            self.status.text = f"{self.chat.state}... {self.chat.tokens} tokens"
        elif self.status.text.endswith("tokens"):
            self.status.text = ""
        Clock.schedule_once(lambda _dt: setattr(self.scroll, "scroll_y", 0), 0)  # follow the newest text
