"""One steering mode per file; the file's name is the mode's name and it defines `Controller`
(a server/steering/controller.py `SteeringController` subclass). See docs/architecture.md."""
