"""The few styled widgets the screens are built from (colours and sizes in one place)."""

from __future__ import annotations

from kivy.graphics import Color, Line, RoundedRectangle
from kivy.metrics import dp, sp
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.button import Button
from kivy.uix.label import Label
from kivy.uix.togglebutton import ToggleButton

BACKGROUND = (0.08, 0.09, 0.11, 1)
SURFACE = (0.15, 0.16, 0.19, 1)
USER = (0.14, 0.30, 0.55, 1)
TOOL = (0.10, 0.22, 0.19, 1)
TOOL_EDGE = (0.25, 0.65, 0.50, 1)
ERROR = (0.42, 0.14, 0.14, 1)
ACCENT = (0.20, 0.52, 0.92, 1)
GOOD = (0.30, 0.78, 0.45, 1)
WARN = (0.98, 0.66, 0.25, 1)
TEXT = (0.93, 0.94, 0.96, 1)
MUTED = (0.62, 0.65, 0.70, 1)
MONO = "RobotoMono-Regular"


class Text(Label):
    """A label that wraps to its width and is as tall as its text."""

    def __init__(self, **kwargs):
        kwargs.setdefault("size_hint_y", None)
        kwargs.setdefault("halign", "left")
        kwargs.setdefault("valign", "top")
        kwargs.setdefault("color", TEXT)
        kwargs.setdefault("font_size", sp(15))
        super().__init__(**kwargs)
        self.bind(width=self._wrap, texture_size=self._fit)
        self._wrap()

    def _wrap(self, *_):
        self.text_size = (self.width, None)

    def _fit(self, *_):
        self.height = self.texture_size[1]


class Panel(BoxLayout):
    """A vertical box on a rounded background, as tall as its content (a chat bubble, a card)."""

    def __init__(self, color=SURFACE, edge=None, **kwargs):
        kwargs.setdefault("orientation", "vertical")
        kwargs.setdefault("size_hint_y", None)
        kwargs.setdefault("padding", (dp(12), dp(8)))
        kwargs.setdefault("spacing", dp(4))
        super().__init__(**kwargs)
        self.bind(minimum_height=self.setter("height"))
        with self.canvas.before:
            self._color = Color(*color)
            self._bg = RoundedRectangle(radius=[dp(10)])
            if edge:
                Color(*edge)
                self._edge = Line(width=dp(1.2))
        self.bind(pos=self._draw, size=self._draw)

    def set_color(self, color) -> None:
        self._color.rgba = color

    def _draw(self, *_):
        self._bg.pos, self._bg.size = self.pos, self.size
        if hasattr(self, "_edge"):
            self._edge.rounded_rectangle = (self.x, self.y, self.width, self.height, dp(10))


def button(text: str, on_press=None, color=ACCENT, **kwargs) -> Button:
    kwargs.setdefault("size_hint", (None, None))
    kwargs.setdefault("height", dp(44))
    kwargs.setdefault("width", dp(96))
    kwargs.setdefault("font_size", sp(15))
    b = Button(text=text, background_normal="", background_color=color, color=TEXT, **kwargs)
    if on_press:
        b.bind(on_press=lambda *_: on_press())
    return b


def toggle(text: str, group: str, state: str = "normal", **kwargs) -> ToggleButton:
    kwargs.setdefault("size_hint_y", None)
    kwargs.setdefault("height", dp(44))
    kwargs.setdefault("font_size", sp(15))
    t = ToggleButton(text=text, group=group, state=state, background_normal="", background_down="",
                     color=TEXT, allow_no_selection=False, **kwargs)

    def paint(*_):
        t.background_color = ACCENT if t.state == "down" else SURFACE

    t.bind(state=paint)
    paint()
    return t


def heading(text: str, **kwargs) -> Text:
    return Text(text=f"[b]{text}[/b]", markup=True, font_size=sp(17), **kwargs)


def row(*children, height: float = dp(44), spacing: float = dp(8)) -> BoxLayout:
    box = BoxLayout(orientation="horizontal", size_hint_y=None, height=height, spacing=spacing)
    for child in children:
        box.add_widget(child)
    return box
